"""Simulated Z-Net training data: phantoms -> CW boundary data, in parallel, in .npz shards.

Per phantom: chromophore maps on the 100 x 100 grid -> mesh nodes (bilinear, disk pixels only)
-> mu_a at the 9 wavelengths (mu_s' homogeneous, power law; the paper reconstructs only
HbO/Hb/water and does not vary scattering) -> FEM amplitudes, 9 x 16 x 15 = 2160 values
(order: see :mod:`deepimaging.nirst.forward`) -> 2 % multiplicative Gaussian noise.

Speed (this 2-core machine, default 1 mm mesh of 5729 nodes): 0.15 s of CPU per phantom,
so ~6.7 phantoms/s per idle core and ~13 phantoms/s with ``workers=2`` -- the paper's 20,000
phantoms in ~26 min.  Measured while the machine was shared with other jobs (load average ~6):
4.4 phantoms/s with ``workers=2``.  ``element_size_mm=1.5`` is ~2.5x faster at ~2 % model error
instead of < 1 %; shard the run (``shard_range``) across machines for more.

Phantom distribution (``distribution``, stored in ``meta``): ``"paper"`` (default) or
``"robust"`` (:mod:`deepimaging.nirst.robust_phantoms`).  Per phantom the files also hold
``inclusion_mri_ratio`` (MRI grey ratio inclusion/background, NaN-padded) and ``phantom_kind``
(index into ``PHANTOM_KINDS``).

Dataset files: one compressed ``.npz`` per shard holding the arrays below and a JSON ``meta``
string (no pickles).  ``mri`` is stored as float16 (its 4 % noise dwarfs float16 rounding) and
returned as float32.  A folder of shards loads as one dataset, ordered by phantom index.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from deepimaging.core.parallel import single_threaded_children
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report

from .forward import DEFAULT_REFRACTIVE_INDEX, DiffusionForwardModel
from .mesh import (
    DEFAULT_DIAMETER_MM,
    DEFAULT_ELEMENT_SIZE_MM,
    DEFAULT_GRID_SIZE,
    make_disk_mesh,
    pixel_to_node_matrix,
)
from .optics import (
    DEFAULT_SCATTERING_AMPLITUDE,
    DEFAULT_SCATTERING_POWER,
    WAVELENGTHS_NM,
    absorption,
    reduced_scattering,
)
from .phantoms import CHROMOPHORE_UNITS, CHROMOPHORES, DISTRIBUTIONS, MRI_NOISE, make_phantom, phantom_generator

DATASET_FORMAT = "deepimaging.nirst.dataset"
DATASET_FORMAT_VERSION = 1
PER_PHANTOM_KEYS = (
    "measurements", "mri", "maps", "indices", "inclusion_count",
    "inclusion_centres_mm", "inclusion_diameters_mm", "background_values", "inclusion_values",
    "inclusion_mri_ratio", "phantom_kind",
)
PHANTOM_KINDS = ("paper", "both", "mri_only", "optics_only")

_WORKER_STATE: Dict[str, Any] = {}
def shard_range(n: int, k: int, nshards: int) -> Tuple[int, int]:
    """(start, count) of shard ``k`` of ``nshards`` contiguous, near-equal shards of ``n`` phantoms."""
    if nshards < 1 or not 0 <= k < nshards:
        raise ValueError(f"shard {k}/{nshards} is out of range")
    base, extra = divmod(int(n), int(nshards))
    return k * base + min(k, extra), base + (1 if k < extra else 0)


def _blas_single_thread() -> Any:
    """Limit BLAS to one thread in this process (threadpoolctl when present, else a no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _build_state(settings: Dict[str, Any]) -> Dict[str, Any]:
    """Everything one simulating process reuses across phantoms: mesh, FEM maps, transfers."""
    mesh = make_disk_mesh(settings["diameter_mm"], settings["element_size_mm"])
    return dict(
        settings=settings,
        model=DiffusionForwardModel(mesh, settings["n_optodes"], settings["refractive_index"]),
        pixels_to_nodes=pixel_to_node_matrix(mesh, settings["grid_size"]),
        musp=reduced_scattering(
            settings["wavelengths_nm"], settings["scattering_amplitude"], settings["scattering_power"]
        ),
    )


def _init_worker(settings: Dict[str, Any]) -> None:
    _WORKER_STATE.update(_build_state(settings))


def _simulate_one(index: int, state: Dict[str, Any]) -> Dict[str, np.ndarray]:
    settings = state["settings"]
    phantom = make_phantom(index, settings["seed"], settings["diameter_mm"], settings["grid_size"],
                           settings.get("distribution", "paper"))
    amplitudes = measure_maps(phantom.maps, state)
    noise = phantom_generator(settings["seed"], index, 1).standard_normal(amplitudes.shape)
    amplitudes = amplitudes * (1.0 + settings["noise"] * noise)
    k = len(phantom.diameters_mm)
    centres = np.full((2, 2), np.nan)
    diameters = np.full(2, np.nan)
    values = np.full((2, 3), np.nan)
    ratios = np.full(2, np.nan)
    centres[:k], diameters[:k], values[:k] = phantom.centres_mm, phantom.diameters_mm, phantom.inclusion_values
    ratios[:k] = phantom.mri_ratio
    return {
        "inclusion_mri_ratio": ratios.astype(np.float32),
        "phantom_kind": np.int8(PHANTOM_KINDS.index(phantom.kind)),
        "measurements": amplitudes.astype(np.float32),
        "mri": phantom.mri,
        "maps": phantom.maps,
        "indices": np.int64(index),
        "inclusion_count": np.int8(k),
        "inclusion_centres_mm": centres.astype(np.float32),
        "inclusion_diameters_mm": diameters.astype(np.float32),
        "background_values": phantom.background.astype(np.float32),
        "inclusion_values": values.astype(np.float32),
    }


def measure_maps(maps: np.ndarray, state: Dict[str, Any]) -> np.ndarray:
    """Noise-free amplitudes (9 * N * (N - 1),) of chromophore maps (3, H, W) [uM, uM, %]."""
    settings = state["settings"]
    nodal = state["pixels_to_nodes"] @ np.asarray(maps).reshape(3, -1).astype(float).T  # (n_nodes, 3)
    mua = absorption(nodal[:, 0], nodal[:, 1], nodal[:, 2] / 100.0, settings["wavelengths_nm"])
    return state["model"].measure(mua, state["musp"]).ravel()


def simulation_settings(seed: int = 0, noise: float = 0.02, n_optodes: int = 16,
                        element_size_mm: float = DEFAULT_ELEMENT_SIZE_MM,
                        distribution: str = "paper") -> Dict[str, Any]:
    """The settings one simulating process needs (JSON-able); see :func:`simulate_phantoms`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown phantom distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    return {
        "seed": int(seed), "noise": float(noise), "n_optodes": int(n_optodes),
        "diameter_mm": DEFAULT_DIAMETER_MM, "grid_size": DEFAULT_GRID_SIZE,
        "element_size_mm": float(element_size_mm), "refractive_index": DEFAULT_REFRACTIVE_INDEX,
        "wavelengths_nm": list(WAVELENGTHS_NM), "scattering_amplitude": DEFAULT_SCATTERING_AMPLITUDE,
        "scattering_power": DEFAULT_SCATTERING_POWER, "distribution": distribution,
    }


def simulation_state(settings: Dict[str, Any]) -> Dict[str, Any]:
    """Mesh, forward model and pixel-to-node map for :func:`measure_maps` (reuse across phantoms)."""
    return _build_state(settings)


def _simulate_chunk_in_worker(indices: List[int]) -> List[Dict[str, np.ndarray]]:
    return [_simulate_one(i, _WORKER_STATE) for i in indices]


def simulate_phantoms(
    n: int,
    seed: int = 0,
    start: int = 0,
    noise: float = 0.02,
    n_optodes: int = 16,
    workers: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    element_size_mm: float = DEFAULT_ELEMENT_SIZE_MM,
    chunk_size: int = 4,
    distribution: str = "paper",
) -> Dict[str, Any]:
    """Simulate phantoms ``start .. start + n - 1`` of dataset ``seed``.

    Returns arrays ``measurements`` (n, 9 * N * (N - 1)) float32 amplitudes, ``mri``
    (n, 100, 100), ``maps`` (n, 3, 100, 100) [HbO uM, Hb uM, water %], ``indices`` and the
    per-phantom geometry/values, plus ``meta`` (a JSON-able dict).  ``workers=None`` uses
    every core, ``workers=1`` runs in this process.  Results do not depend on ``workers``.
    ``distribution``: ``"paper"`` or ``"robust"`` phantoms (module docstring).
    """
    from deepimaging import __version__

    settings = simulation_settings(seed, noise, n_optodes, element_size_mm, distribution)
    indices = list(range(int(start), int(start) + int(n)))
    chunks = [indices[i:i + chunk_size] for i in range(0, len(indices), chunk_size)]
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(chunks)))
    results: List[Dict[str, np.ndarray]] = []
    began = time.perf_counter()

    def progress_message() -> str:
        rate = len(results) / max(time.perf_counter() - began, 1e-9)
        return f"{len(results)}/{n} phantoms, {rate:.1f}/s"

    report(progress, 0.0, f"simulating {n} phantoms")
    if workers == 1:
        with _blas_single_thread():  # SuperLU's small BLAS calls only lose from threading
            state = _build_state(settings)
            for chunk in chunks:
                check_cancel(cancel)
                results.extend(_simulate_one(i, state) for i in chunk)
                report(progress, len(results) / max(1, n), progress_message())
    else:
        # "spawn": workers start clean (no inherited threads, Qt or torch state from the host).
        context = multiprocessing.get_context("spawn")
        with single_threaded_children():
            pool = context.Pool(workers, initializer=_init_worker, initargs=(settings,))
        try:
            for chunk_result in pool.imap(_simulate_chunk_in_worker, chunks):
                results.extend(chunk_result)
                report(progress, len(results) / max(1, n), progress_message())
                check_cancel(cancel)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    data: Dict[str, Any] = {
        key: np.stack([r[key] for r in results]) if results else np.empty(0) for key in PER_PHANTOM_KEYS
    }
    data["meta"] = {
        "format": DATASET_FORMAT, "format_version": DATASET_FORMAT_VERSION,
        "package_version": __version__, "seed": int(seed), "start": int(start), "stop": int(start) + int(n),
        "count": int(n), "shards": [[int(start), int(start) + int(n)]],
        "wavelengths_nm": list(WAVELENGTHS_NM), "n_optodes": int(n_optodes),
        "optode_angles_deg": [360.0 * i / n_optodes for i in range(n_optodes)],
        "measurement_order": "wavelength, source, detector (source-major; detectors ascending, source skipped)",
        "measurement_kind": "CW amplitude (fluence at the rim per unit source power)",
        "noise": float(noise), "noise_model": "multiplicative Gaussian, amplitude * (1 + noise * N(0, 1))",
        "mri_noise": MRI_NOISE if distribution == "paper" else "random, see robust_phantoms",
        "distribution": distribution, "phantom_kinds": list(PHANTOM_KINDS), "diameter_mm": DEFAULT_DIAMETER_MM, "grid_size": DEFAULT_GRID_SIZE,
        "map_channels": list(CHROMOPHORES), "map_units": list(CHROMOPHORE_UNITS),
        "element_size_mm": float(element_size_mm), "refractive_index": DEFAULT_REFRACTIVE_INDEX,
        "scattering_amplitude_per_mm": DEFAULT_SCATTERING_AMPLITUDE, "scattering_power": DEFAULT_SCATTERING_POWER,
    }
    report(progress, 1.0, f"{n} phantoms simulated")
    return data


def save_dataset(path: Union[str, Path], data: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write one compressed shard; ``meta`` defaults to ``data['meta']``."""
    meta = dict(meta if meta is not None else data.get("meta", {}))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: np.asarray(data[key]) for key in PER_PHANTOM_KEYS if key in data}
    if "mri" in arrays:
        arrays["mri"] = arrays["mri"].astype(np.float16)
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def _load_file(path: Path) -> Dict[str, Any]:
    with np.load(path, allow_pickle=False) as archive:
        data: Dict[str, Any] = {key: archive[key] for key in archive.files if key != "meta"}
        meta = json.loads(str(archive["meta"])) if "meta" in archive.files else {}
    if "mri" in data:
        data["mri"] = data["mri"].astype(np.float32)
    data["meta"] = meta
    return data


def load_dataset(path_or_folder: Union[str, Path]) -> Dict[str, Any]:
    """Load one shard, or every ``*.npz`` shard of a folder merged in phantom-index order."""
    path = Path(path_or_folder)
    if path.is_file():
        return _load_file(path)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz dataset shards in {path}")
    shards = sorted((_load_file(f) for f in files), key=lambda d: int(d["meta"].get("start", 0)))
    first = shards[0]["meta"]
    for shard in shards[1:]:
        for key in ("seed", "wavelengths_nm", "n_optodes", "noise", "grid_size", "diameter_mm", "distribution"):
            if shard["meta"].get(key, "paper" if key == "distribution" else None) != \
                    first.get(key, "paper" if key == "distribution" else None):
                raise ValueError(f"shards disagree on {key!r}: {shard['meta'].get(key)} vs {first.get(key)}")
    merged: Dict[str, Any] = {
        key: np.concatenate([s[key] for s in shards]) for key in PER_PHANTOM_KEYS if all(key in s for s in shards)
    }
    if "indices" in merged and len(np.unique(merged["indices"])) != len(merged["indices"]):
        raise ValueError("shards overlap: some phantom indices appear twice")
    meta = dict(first)
    meta["shards"] = [r for s in shards for r in s["meta"].get("shards", [])]
    meta["count"] = int(sum(len(s["measurements"]) for s in shards))
    meta["start"] = int(min(s["meta"].get("start", 0) for s in shards))
    meta["stop"] = int(max(s["meta"].get("stop", 0) for s in shards))
    merged["meta"] = meta
    return merged
