"""NIRST physics for Z-Net: spectra, disk mesh, CW diffusion FEM, phantoms and simulated datasets.

The pieces the NIRSTRecon pipeline needs: :func:`absorption` (chromophores -> mu_a at the nine
wavelengths), :class:`DiffusionForwardModel` (boundary amplitudes and their mu_a Jacobian on a
:func:`make_disk_mesh` mesh), :func:`make_phantom` (paper-style phantoms on the 100 x 100 grid)
and :func:`simulate_phantoms` / :func:`save_dataset` / :func:`load_dataset` for training data.
"""

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

__all__ = [
    "CHROMOPHORES",
    "DiffusionForwardModel",
    "DiskMesh",
    "Phantom",
    "WAVELENGTHS_NM",
    "absorption",
    "boundary_mismatch_factor",
    "diffusion_coefficient",
    "disk_mask",
    "load_dataset",
    "make_disk_mesh",
    "make_phantom",
    "measurement_subset",
    "node_to_pixel_matrix",
    "optode_angles",
    "optode_positions",
    "pixel_centres",
    "pixel_to_node_matrix",
    "reduced_scattering",
    "save_dataset",
    "shard_range",
    "simulate_phantoms",
    "spectral_matrix",
]
