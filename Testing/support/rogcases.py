"""Tiny ROG plans and checkpoints for tests (plain Python: also run inside Slicer-like children)."""

from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.rog.plan import ChannelInfo, LabelInfo, Plan

LABELS = [LabelInfo(0, "background", "background"), LabelInfo(1, "liver", "organ"),
          LabelInfo(2, "liver tumour", "lesion")]


def tiny_plan(channels=1):
    """A hand-made plan for a small CT-like grid (spacing (z, y, x) 1.8, 0.9, 0.9 mm)."""
    return Plan("Tiny", 1, [ChannelInfo("CT", "clip_zscore", 0.0, 200.0, 100.0, 50.0)] * channels, list(LABELS),
                (1.8, 0.9, 0.9), (1.8, 0.9, 0.9), None, (20, 36, 36), (16, 32, 32), ((2, 2, 2), (2, 2, 2)), (1, 1, 1))


def save_rog(path, plan):
    """A randomly initialised ROG saved with the header train.py writes (method, config, plan, labels)."""
    import torch

    torch.manual_seed(0)
    model = plan.build_model()
    header = make_header("rog", model.config(), preprocessing=plan.to_dict(),
                         labels={str(lb.value): lb.name for lb in plan.labels}, metrics={"dice_mean": 0.5, "epoch": 3})
    save_checkpoint(path, model.state_dict(), header)
    return path
