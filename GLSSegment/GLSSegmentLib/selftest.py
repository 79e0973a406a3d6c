"""Generated inputs for the module's self-test (GLSSegmentTest): synthetic B-scans and a small GLS.

Kept in the Lib so the self-test inside Slicer and the headless tests build the same things.
"""

import os

import numpy as np

from DeepImagingCommonLib import nodes

# A small network grid and crop, so a randomly initialised GLS runs in well under a second on a CPU.
SELF_TEST_SIZE = (64, 64)
SELF_TEST_CROP = 32
SELF_TEST_WIDTHS = (4, 8, 16, 32, 64)
# Physical geometry of the generated B-scans: 30 x 20 um pixels, 0.25 mm between B-scans, shifted origin.
SELF_TEST_SPACING = (0.03, 0.02, 0.25)
SELF_TEST_ORIGIN = (-4.0, 2.5, 10.0)


def bscanVolume(name="GLSSegmentTestBScan", slices=1, size=(96, 128), seed=0, spacing=SELF_TEST_SPACING,
                origin=SELF_TEST_ORIGIN):
    """Synthetic AS-OCT B-scans (``deepimaging.gls.synthetic.make_bscan``, seeds ``seed``, ``seed + 1``, ...)
    stacked along k as a volume node; returns ``(volumeNode, masks (S, H, W) uint8, keypoints (S, 2, 2) xy)``."""
    from deepimaging.core.image import Image
    from deepimaging.gls.synthetic import make_bscan

    scans = [make_bscan(seed + s, size) for s in range(int(slices))]
    image = Image(np.stack([scan.image for scan in scans]).astype(np.float32), spacing, origin)
    masks = np.stack([scan.mask for scan in scans]).astype(np.uint8)
    keypoints = np.stack([scan.keypoints for scan in scans])
    return nodes.volumeNodeFromImage(image, name), masks, keypoints


def randomCheckpoint(folder, architecture="gls", seed=0, keypoints=2, cropSize=SELF_TEST_CROP, name="best.pt"):
    """A randomly initialised small network saved as ``folder/<name>`` with the header that
    ``deepimaging gls train`` writes (method "gls", arch, config, preprocessing size and
    normalisation, keypoint rule, stage reached)."""
    import torch
    from deepimaging.core.checkpoint import make_header, save_checkpoint
    from deepimaging.gls.infer import build_network
    from deepimaging.gls.model import GLSNet

    torch.manual_seed(seed)
    if architecture == "gls":
        model = GLSNet(keypoints=keypoints, crop_size=(int(cropSize), int(cropSize)), widths=SELF_TEST_WIDTHS)
        config = model.config()
    else:
        config = {"in_channels": 1, "widths": list(SELF_TEST_WIDTHS)}
        config.update({"keypoints": keypoints} if architecture == "global" else {"width_scale": 1.0})
        model = build_network(architecture, config)
    withKeypoints = architecture in ("gls", "global")
    header = make_header(
        "gls", config,
        preprocessing={"size": list(SELF_TEST_SIZE), "normalisation": "minmax",
                       "resize": "linear (scipy.ndimage.zoom, pixel-area grid)", "in_channels": 1},
        labels={"1": "foreground"}, arch=architecture,
        training={"arch": architecture, "epochs": 0, "note": "randomly initialised for the GLSSegment self-test"},
        stage_reached=3 if withKeypoints else None, keypoint_rule="iris-tails" if withKeypoints else None,
        keypoint_source="keypoints.csv where listed, else derived from the mask by the rule")
    return save_checkpoint(os.path.join(str(folder), name), model.state_dict(), header)
