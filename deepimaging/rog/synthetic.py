"""Built-in synthetic 3D data for ROG's tests and demo: noisy volumes with one or two blob organs.

Organ 1 is a bright ellipsoid, organ 2 (optional) a smaller, brighter sphere beside it; both sit
on a smoothly varying background with noise, so a threshold alone is not quite enough but a
small network learns the task in a few dozen steps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from deepimaging.core.image import Image
from deepimaging.core.imageio import write_image

from .plan import Plan, estimate_memory_bytes

BLOB_LABELS: Dict[int, str] = {0: "background", 1: "liver", 2: "kidney"}


def make_blob_case(shape: Sequence[int] = (48, 48, 48), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   seed: int = 0, organs: int = 2, noise: float = 20.0) -> Tuple[Image, Image]:
    """(image, label map) on one grid; ``spacing`` is (x, y, z) mm and blob sizes are in mm."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp_zyx = np.asarray(spacing, float)[::-1]
    coords = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp_zyx)], indexing="ij"), -1)
    extent = np.asarray(shape) * sp_zyx
    label = np.zeros(shape, np.uint8)
    centre = extent * rng.uniform(0.38, 0.5, 3)
    radii = extent * rng.uniform(0.18, 0.26, 3)
    label[(((coords - centre) / radii) ** 2).sum(-1) <= 1] = 1
    if organs >= 2:
        centre2 = centre + radii * np.sign(rng.uniform(-1, 1, 3)) * 0.9 + extent * 0.1
        centre2 = np.clip(centre2, extent * 0.2, extent * 0.8)
        radius2 = extent.min() * rng.uniform(0.1, 0.14)
        label[((coords - centre2) ** 2).sum(-1) <= radius2 ** 2] = 2
    background = ndimage.gaussian_filter(rng.normal(0, 1, shape), 4) * 150
    image = 40.0 + background + noise * rng.normal(0, 1, shape)
    image[label == 1] += 90.0
    image[label == 2] += 180.0
    geometry = Image(np.zeros(shape, np.uint8), tuple(spacing), (-10.0, 20.0, 5.0))
    return geometry.with_array(image.astype(np.float32)), geometry.with_array(label)


def write_blob_dataset(root: Path, cases: int = 4, shape: Sequence[int] = (48, 48, 48),
                       spacing: Sequence[float] = (1.0, 1.0, 1.0), organs: int = 2, seed: int = 0,
                       modality: str = "CT") -> Path:
    """An MSD-layout folder (dataset.json, imagesTr/, labelsTr/) of blob cases; returns ``root``."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    training: List[Dict[str, str]] = []
    for i in range(cases):
        image, label = make_blob_case(shape, spacing, seed + i, organs)
        write_image(image, root / "imagesTr" / f"blob_{i:03d}.nii.gz")
        write_image(label, root / "labelsTr" / f"blob_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/blob_{i:03d}.nii.gz", "label": f"./labelsTr/blob_{i:03d}.nii.gz"})
    labels = {str(k): v for k, v in BLOB_LABELS.items() if k <= organs}
    meta = {"name": "Blobs", "labels": labels, "modality": {"0": modality}, "training": training,
            "numTraining": cases}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return root


def cpu_friendly(plan: Plan, patch_size: Sequence[int] = (32, 32, 32)) -> Plan:
    """The plan with stride-2 stems, a stride-1 lattice entry and a small patch.

    For tests and the demo only: the planner keeps small images at full resolution in the stem,
    which is right for accuracy but ~4x slower on a CPU; this keeps each training step well
    under a second on two cores.  Patch axes must be multiples of 16.
    """
    stem, lattice, patch = ((2, 2, 2), (2, 2, 2)), (1, 1, 1), tuple(int(p) for p in patch_size)
    memory = estimate_memory_bytes(patch, stem, lattice, len(plan.channels), len(plan.labels), plan.batch_size)
    return replace(plan, stem_strides=stem, lattice_stride=lattice, patch_size=patch, estimated_memory_bytes=memory)
