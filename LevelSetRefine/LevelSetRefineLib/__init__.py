"""Qt-free Logic of the LevelSetRefine module, shared with its Segment Editor effect."""

from .effect import (MAX_ITERATIONS_PARAMETER, MU_PARAMETER, applyRefinementEffect, describeEffectError,
                     isOutOfMemoryError)
from .logic import DEFAULT_ITERATIONS, DEFAULT_MU, LevelSetRefineLogic, chanVeseParams, refineImageMask, refineOrientedLabelmap

__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_MU", "MAX_ITERATIONS_PARAMETER", "MU_PARAMETER", "LevelSetRefineLogic",
           "applyRefinementEffect", "chanVeseParams", "describeEffectError", "isOutOfMemoryError", "refineImageMask",
           "refineOrientedLabelmap"]
