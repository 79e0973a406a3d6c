"""NIRST physics for Z-Net: spectra, disk mesh, CW diffusion FEM, phantoms and simulated datasets.

The pieces the NIRSTRecon pipeline needs: :func:`absorption` (chromophores -> mu_a at the nine
wavelengths), :class:`DiffusionForwardModel` (boundary amplitudes and their mu_a Jacobian on a
:func:`make_disk_mesh` mesh), :func:`make_phantom` (paper-style phantoms on the 100 x 100 grid)
and :func:`simulate_phantoms` / :func:`save_dataset` / :func:`load_dataset` for training data;
:class:`DRIReconstructor` (the model-based baseline); and, imported on first use because they
need torch, :func:`train_network`, :func:`evaluate` and the reconstruction API of
:mod:`deepimaging.nirst.recon` (:func:`load_reconstructor`, :func:`reconstruct_image`, ...).
Simulation workers import this package, so it stays torch-free at import time.
"""

import importlib
from typing import Any

from .dri import DRIReconstructor, DRIResult, reference_amplitudes
from .forward import DiffusionForwardModel, boundary_mismatch_factor, diffusion_coefficient, measurement_subset
from .mesh import (
    DiskMesh,
    disk_mask,
    make_disk_mesh,
    node_to_pixel_matrix,
    optode_angles,
    optode_positions,
    pixel_centres,
    pixel_to_node_matrix,
)
from .optics import WAVELENGTHS_NM, absorption, reduced_scattering, spectral_matrix
from .phantoms import CHROMOPHORES, Phantom, make_phantom
from .simulate import load_dataset, save_dataset, shard_range, simulate_phantoms
from .calibration import Calibration, Medium, calibrate, check_scale
from .geometry import OptodeGeometry

# Torch-dependent names, resolved lazily (PEP 562).
_LAZY = {
    "train_network": "train", "evaluate": "evaluate", "NirstDataset": "data", "split_indices": "data",
    "DEFAULT_CHECKPOINT": "recon", "SHIPPED_NETWORKS": "recon", "Reconstructor": "recon", "hbt_contrast": "recon",
    "load_reconstructor": "recon", "read_measurements": "recon", "reconstruct_image": "recon",
    "simulate_example": "recon", "reconstruct": "pipeline", "ReconstructionOutput": "pipeline",
    "data_misfit": "consistency", "robustness_evaluation": "robustness_eval",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHROMOPHORES",
    "Calibration",
    "Medium",
    "OptodeGeometry",
    "ReconstructionOutput",
    "calibrate",
    "check_scale",
    "data_misfit",
    "reconstruct",
    "robustness_evaluation",
    "DEFAULT_CHECKPOINT",
    "SHIPPED_NETWORKS",
    "DRIReconstructor",
    "DRIResult",
    "DiffusionForwardModel",
    "NirstDataset",
    "Reconstructor",
    "DiskMesh",
    "Phantom",
    "WAVELENGTHS_NM",
    "absorption",
    "boundary_mismatch_factor",
    "diffusion_coefficient",
    "disk_mask",
    "evaluate",
    "hbt_contrast",
    "load_dataset",
    "load_reconstructor",
    "make_disk_mesh",
    "make_phantom",
    "measurement_subset",
    "node_to_pixel_matrix",
    "optode_angles",
    "optode_positions",
    "pixel_centres",
    "pixel_to_node_matrix",
    "read_measurements",
    "reconstruct_image",
    "reduced_scattering",
    "reference_amplitudes",
    "save_dataset",
    "shard_range",
    "simulate_example",
    "simulate_phantoms",
    "spectral_matrix",
    "split_indices",
    "train_network",
]
