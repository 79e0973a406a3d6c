"""Qt-free Logic of the NIRSTRecon module."""

from .logic import (
    ARCHITECTURES,
    CALIBRATION_MODES,
    DEVICES,
    METHODS,
    WINDINGS,
    OUTPUT_MAPS,
    NIRSTReconLogic,
    ReconstructionResult,
    SimulatedPhantom,
    deviceArgument,
    optionalPath,
    sliceImage,
    trainingProgress,
)

__all__ = ["ARCHITECTURES", "CALIBRATION_MODES", "DEVICES", "METHODS", "WINDINGS", "OUTPUT_MAPS", "NIRSTReconLogic", "ReconstructionResult", "SimulatedPhantom",
           "deviceArgument", "optionalPath", "sliceImage", "trainingProgress"]
