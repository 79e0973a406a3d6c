"""GLS (global + local keypoint-guided segmentation of 2D B-scans): synthetic data, keypoints, data
loading, networks and training.  Import the submodules directly (``deepimaging.gls.keypoints`` ...)."""
