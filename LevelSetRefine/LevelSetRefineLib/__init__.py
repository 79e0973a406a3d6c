"""Qt-free Logic of the LevelSetRefine module, shared with its Segment Editor effect."""

from .effect import (CHECKPOINT_PARAMETER, MAX_ITERATIONS_PARAMETER, METHOD_PARAMETER, MU_PARAMETER,
                     applyRefinementEffect, describeEffectError, effectParameters, isOutOfMemoryError)
from .export import (TrainingData, checkDataFolder, describePairs, exportTrainingData, pairsFromSegmentations,
                     referenceVolume)
from .learned import (METHOD_CHOICES, METHOD_CLASSIC, METHOD_LEARNED, clearRefinerCache, describeRefiner,
                      loadRefiner, roiVoxelBox)
from .logic import DEFAULT_ITERATIONS, DEFAULT_MU, LevelSetRefineLogic, chanVeseParams, refineImageMask, refineOrientedLabelmap
from .training import TrainingJob, TrainingStatus, parseTrainingLine, trainingCommand

__all__ = ["CHECKPOINT_PARAMETER", "DEFAULT_ITERATIONS", "DEFAULT_MU", "MAX_ITERATIONS_PARAMETER", "METHOD_CHOICES",
           "METHOD_CLASSIC", "METHOD_LEARNED", "METHOD_PARAMETER", "MU_PARAMETER", "LevelSetRefineLogic",
           "TrainingData", "TrainingJob", "TrainingStatus", "applyRefinementEffect", "chanVeseParams",
           "checkDataFolder", "clearRefinerCache", "describeEffectError", "describePairs", "describeRefiner",
           "effectParameters", "exportTrainingData", "isOutOfMemoryError", "loadRefiner", "pairsFromSegmentations",
           "parseTrainingLine", "referenceVolume", "refineImageMask", "refineOrientedLabelmap", "roiVoxelBox",
           "trainingCommand"]
