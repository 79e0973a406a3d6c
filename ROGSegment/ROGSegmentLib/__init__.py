"""Qt-free Logic of the ROGSegment module: inference into segmentation nodes, training jobs."""

from .logic import (DEVICE_CHOICES, MODALITY_CHOICES, ModelInfo, ROGSegmentLogic, isPathSet, modelDescription,
                    readModelInfo, requireModelPath, segmentColor, volumeImage)
from .export import (TrainingData, describePairs, exportTrainingData, pairsFromSegmentations, prepareDataFolder,
                     referenceVolume)
from .training import TrainingJob, TrainingStatus, parseTrainingLine, trainingSteps
from .robustness import (ATTACK_CHOICES, DEFAULT_ATTACKS, DEFAULT_EPS, ROGRobustnessLogic, RobustnessOutputs,
                         parseEps, referenceLabelImage)

__all__ = ["DEVICE_CHOICES", "MODALITY_CHOICES", "ModelInfo", "ROGSegmentLogic", "isPathSet", "modelDescription",
           "readModelInfo", "requireModelPath", "segmentColor", "volumeImage", "TrainingData", "describePairs",
           "exportTrainingData", "pairsFromSegmentations", "prepareDataFolder", "referenceVolume", "TrainingJob",
           "TrainingStatus", "parseTrainingLine", "trainingSteps", "ATTACK_CHOICES", "DEFAULT_ATTACKS", "DEFAULT_EPS",
           "ROGRobustnessLogic", "RobustnessOutputs", "parseEps", "referenceLabelImage"]
