"""Qt-free Logic of the LevelSetRefine module, shared with its Segment Editor effect."""

from .logic import DEFAULT_ITERATIONS, DEFAULT_MU, LevelSetRefineLogic, chanVeseParams, refineImageMask, refineOrientedLabelmap

__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_MU", "LevelSetRefineLogic", "chanVeseParams", "refineImageMask", "refineOrientedLabelmap"]
