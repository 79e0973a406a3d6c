"""Qt-free Logic of the GLSSegment module: B-scan segmentation + keypoints into new nodes, training jobs."""

from .logic import (ARCHITECTURE_CHOICES, DEVICE_CHOICES, FOREGROUND_SEGMENT_NAME, GLSOutputs, GLSSegmentLogic,
                    ModelInfo, bscanImage, isPathSet, keypointLabel, keypointNames, keypointsRAS, modelDescription,
                    readModelInfo, requireModelPath)
from .export import (TrainingData, checkDataFolder, describePairs, exportTrainingData, foregroundSegmentId,
                     pairsFromSegmentations, referenceVolume)
from .training import TrainingJob, TrainingStatus, parseTrainingLine, trainingCommand

__all__ = ["ARCHITECTURE_CHOICES", "DEVICE_CHOICES", "FOREGROUND_SEGMENT_NAME", "GLSOutputs", "GLSSegmentLogic",
           "ModelInfo", "bscanImage", "isPathSet", "keypointLabel", "keypointNames", "keypointsRAS",
           "modelDescription", "readModelInfo", "requireModelPath", "TrainingData", "checkDataFolder",
           "describePairs", "exportTrainingData", "foregroundSegmentId", "pairsFromSegmentations",
           "referenceVolume", "TrainingJob", "TrainingStatus", "parseTrainingLine", "trainingCommand"]
