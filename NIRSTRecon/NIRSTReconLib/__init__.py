"""Qt-free Logic of the NIRSTRecon module."""

from .logic import (
    ARCHITECTURES,
    DEVICES,
    OUTPUT_MAPS,
    NIRSTReconLogic,
    ReconstructionResult,
    SimulatedPhantom,
    deviceArgument,
    optionalPath,
    sliceImage,
    trainingProgress,
)

__all__ = ["ARCHITECTURES", "DEVICES", "OUTPUT_MAPS", "NIRSTReconLogic", "ReconstructionResult", "SimulatedPhantom",
           "deviceArgument", "optionalPath", "sliceImage", "trainingProgress"]
