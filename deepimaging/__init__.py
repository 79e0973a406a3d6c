"""SlicerDeepImaging's shared PyTorch library.

Four published deep-learning methods (GLS, ROG, Z-Net NIRST, deep Chan-Vese level sets)
on one core of device handling, checkpoints, image I/O with geometry, metrics and
progress reporting.  Nothing in this package imports Slicer, Qt or VTK, so the same
pipeline functions serve the Slicer modules, the Python console and the ``deepimaging`` CLI.
"""

__version__ = "0.1.0"
