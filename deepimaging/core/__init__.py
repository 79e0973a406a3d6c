"""Shared infrastructure: device, image + geometry, I/O, checkpoints, metrics, progress."""
