"""Slicer-side helpers shared by every SlicerDeepImaging module.

Submodules are imported on demand (``from DeepImagingCommonLib import nodes``) and none of
them imports Qt, so module Logic runs headless on ``slicer-core``; ``dependencies`` and
``process`` do not even need ``slicer``, and nothing here imports torch at import time.
"""
