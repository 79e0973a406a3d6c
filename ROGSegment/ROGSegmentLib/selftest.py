"""Generated inputs for the module's self-test (ROGSegmentTest): a blob volume and a small ROG.

Kept in the Lib so the self-test inside Slicer and the headless tests build the same things.
"""

import os

from DeepImagingCommonLib import nodes

SELF_TEST_LABELS = ((0, "background", "background"), (1, "liver", "organ"), (2, "kidney", "organ"))


def blobVolume(name="ROGSegmentTestVolume", seed=0):
    """A 32^3 CT-like volume with two blob organs as a volume node, and its label array (1 liver, 2 kidney)."""
    from deepimaging.rog.synthetic import make_blob_case

    image, labels = make_blob_case((32, 32, 32), seed=seed)
    return nodes.volumeNodeFromImage(image, name), labels.array


def randomCheckpoint(folder, seed=0):
    """A randomly initialised ROG for 32^3 CT-like input saved as ``folder/best.pt`` (as training writes it)."""
    import torch
    from deepimaging.core.checkpoint import make_header, save_checkpoint
    from deepimaging.rog.plan import ChannelInfo, LabelInfo, Plan

    labels = [LabelInfo(*label) for label in SELF_TEST_LABELS]
    plan = Plan("SelfTest", 1, [ChannelInfo("CT", "clip_zscore", 0.0, 300.0, 150.0, 60.0)], labels, (1.0,) * 3,
                (1.0,) * 3, None, (32,) * 3, (32,) * 3, ((2, 2, 2), (2, 2, 2)), (1, 1, 1))
    torch.manual_seed(seed)
    model = plan.build_model()
    header = make_header("rog", model.config(), preprocessing=plan.to_dict(),
                         labels={str(lb.value): lb.name for lb in labels})
    return save_checkpoint(os.path.join(str(folder), "best.pt"), model.state_dict(), header)
