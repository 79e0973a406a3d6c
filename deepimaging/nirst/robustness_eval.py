"""Held-out robustness cases: does a network take structure or values from the MRI? (issue #11)

Fixed, seeded phantoms on the 82 mm disk (background HbO 14 uM, Hb 7 uM, water 40 %, HbT 21
uM unless stated), each simulated with the FEM forward model (1 mm mesh, 2 % amplitude noise)
and reconstructed by every network given and by DRI:

* ``standard`` -- one 20 mm inclusion, HbO/Hb x2, water x1.5 (HbT 42 uM), MRI grey 80 over 50;
* ``mri_only`` -- the MRI shows a 20 mm inclusion (80 over 50), the optics are homogeneous:
  *invented contrast* = mean HbT inside / outside, truth 1.0;
* ``optics_only`` -- a 20 mm inclusion with HbO/Hb x2 (HbT contrast 2.0), MRI homogeneous:
  *recovered contrast*, truth 2.0;
* ``bright_mri`` -- the standard optics under a brighter MRI inclusion (120 over 50): inclusion
  HbT, truth 42 uM (a network that copies MRI intensity overshoots);
* ``homogeneous_off_level`` -- homogeneous HbO 16, Hb 6, water 35 (between the paper-style
  levels), MRI homogeneous: relative bias of the disk mean per chromophore;
* ``two_inclusions`` -- two 16 mm inclusions, equally bright in the MRI (80 over 50), HbT x1.5
  (31.5 uM) and x2.5 (52.5 uM): each inclusion's HbT.

"Outside" (background) = disk pixels more than 3 mm from every region's edge.  MRI noise: 4 %
multiplicative, as in the paper-style phantoms.  :func:`shipping_check` states the margin a new
network must keep against DRI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deepimaging.core.device import DeviceLike

from .dri import REFERENCE_VALUES, reference_amplitudes, run_dri
from .mesh import DEFAULT_DIAMETER_MM, DEFAULT_GRID_SIZE, disk_mask, pixel_centres
from .phantoms import CHROMOPHORES
from .simulate import measure_maps, simulation_settings, simulation_state

BACKGROUND = (14.0, 7.0, 40.0)
MRI_BACKGROUND_GREY = 50.0
MRI_NOISE = 0.04
BACKGROUND_MARGIN_MM = 3.0
CASE_NAMES = ("standard", "mri_only", "optics_only", "bright_mri", "homogeneous_off_level", "two_inclusions")
# Shipping margin against DRI (issue #11): invented contrast |c - 1| at most DRI's + 0.05,
# recovered optics-only contrast |c - 2| at most DRI's + 0.1.
MRI_ONLY_MARGIN = 0.05
OPTICS_ONLY_MARGIN = 0.10

# name: list of (centre_mm, diameter_mm, optical contrast (HbO, Hb, water), MRI grey), background
_SPECS: Dict[str, Tuple[List[Tuple[Tuple[float, float], float, Tuple[float, float, float], float]],
                        Tuple[float, float, float]]] = {
    "standard": ([((12.0, 8.0), 20.0, (2.0, 2.0, 1.5), 80.0)], BACKGROUND),
    "mri_only": ([((-10.0, 10.0), 20.0, (1.0, 1.0, 1.0), 80.0)], BACKGROUND),
    "optics_only": ([((10.0, -10.0), 20.0, (2.0, 2.0, 1.0), 50.0)], BACKGROUND),
    "bright_mri": ([((12.0, 8.0), 20.0, (2.0, 2.0, 1.5), 120.0)], BACKGROUND),
    "homogeneous_off_level": ([], (16.0, 6.0, 35.0)),
    "two_inclusions": ([((-15.0, 0.0), 16.0, (1.5, 1.5, 1.25), 80.0),
                        ((15.0, 0.0), 16.0, (2.5, 2.5, 1.5), 80.0)], BACKGROUND),
}


def robustness_cases(names: Sequence[str] = CASE_NAMES, seed: int = 0,
                     size: int = DEFAULT_GRID_SIZE) -> List[Dict[str, Any]]:
    """The cases as dicts: ``name``, ``maps`` (3, H, W), ``mri`` (H, W), ``regions`` (k, H, W) bool,
    ``background`` (3,), ``region_values`` (k, 3) and ``far`` (H, W) bool, the background pixels."""
    radius = 0.5 * DEFAULT_DIAMETER_MM
    x, y = pixel_centres(radius, size)
    disk = disk_mask(radius, size)
    cases = []
    for number, name in enumerate(names):
        regions_spec, background = _SPECS[name]
        rng = np.random.default_rng([int(seed), number, 7])
        maps = np.where(disk[None], np.asarray(background, dtype=float)[:, None, None], 0.0)
        grey = np.where(disk, MRI_BACKGROUND_GREY, 0.0)
        regions, values = [], []
        far = disk.copy()
        for centre, diameter, contrast, region_grey in regions_spec:
            distance = np.hypot(x - centre[0], y - centre[1])
            region = distance < 0.5 * diameter
            value = np.asarray(background) * np.asarray(contrast)
            maps[:, region] = value[:, None]
            grey[region] = region_grey
            far &= distance > 0.5 * diameter + BACKGROUND_MARGIN_MM
            regions.append(region)
            values.append(value)
        mri = np.where(disk, grey * (1.0 + MRI_NOISE * rng.standard_normal(grey.shape)), 0.0)
        cases.append({"name": name, "maps": maps.astype(np.float32), "mri": mri.astype(np.float32),
                      "regions": np.array(regions, dtype=bool).reshape(-1, size, size),
                      "region_values": np.array(values, dtype=float).reshape(-1, 3),
                      "background": np.asarray(background, dtype=float), "far": far})
    return cases


def simulate_cases(cases: Sequence[Dict[str, Any]], seed: int = 0, noise: float = 0.02,
                   element_size_mm: float = 1.0) -> np.ndarray:
    """Noisy boundary amplitudes (N, 2160) of the cases (FEM, ``noise`` multiplicative Gaussian)."""
    state = simulation_state(simulation_settings(seed, noise, 16, element_size_mm))
    out = []
    for number, case in enumerate(cases):
        clean = measure_maps(case["maps"], state)
        rng = np.random.default_rng([int(seed), number, 8])
        out.append(clean * (1.0 + noise * rng.standard_normal(clean.shape)))
    return np.array(out)


def _hbt_mean(maps: np.ndarray, mask: np.ndarray) -> float:
    return float((maps[0] + maps[1])[mask].mean())


def case_metrics(case: Dict[str, Any], maps: np.ndarray) -> Dict[str, float]:
    """The case's read-outs (module docstring) for one reconstruction (3, H, W)."""
    far = case["far"]
    disk = disk_mask(0.5 * DEFAULT_DIAMETER_MM, maps.shape[-1])
    name = case["name"]
    out: Dict[str, float] = {}
    for k, region in enumerate(case["regions"]):
        out[f"region{k + 1}_hbt_uM"] = _hbt_mean(maps, region)
        out[f"region{k + 1}_hbt_truth_uM"] = float(case["region_values"][k][:2].sum())
        out[f"region{k + 1}_hbt_contrast"] = _hbt_mean(maps, region) / max(_hbt_mean(maps, far), 1e-12)
        out[f"region{k + 1}_hbt_contrast_truth"] = float(case["region_values"][k][:2].sum() / case["background"][:2].sum())
        for c, chromophore in enumerate(CHROMOPHORES):
            truth = float(case["region_values"][k][c])
            out[f"region{k + 1}_{chromophore}_rel_error"] = float(maps[c][region].mean()) / truth - 1.0
    if name == "homogeneous_off_level":
        for c, chromophore in enumerate(CHROMOPHORES):
            out[f"bias_{chromophore}"] = float(maps[c][disk].mean()) / float(case["background"][c]) - 1.0
        out["bias_HbT"] = _hbt_mean(maps, disk) / float(case["background"][:2].sum()) - 1.0
        out["max_abs_bias"] = max(abs(out[f"bias_{c}"]) for c in CHROMOPHORES)
    return out


HEADLINE: Dict[str, Tuple[str, str, Callable[[Dict[str, float]], float]]] = {
    # case: (label, truth, metric)
    "standard": ("standard: inclusion HbT (uM), truth 42", "42", lambda m: m["region1_hbt_uM"]),
    "mri_only": ("MRI-only lesion: invented HbT contrast, truth 1.00", "1.00", lambda m: m["region1_hbt_contrast"]),
    "optics_only": ("optics-only lesion: recovered HbT contrast, truth 2.00", "2.00",
                    lambda m: m["region1_hbt_contrast"]),
    "bright_mri": ("brighter MRI inclusion (120/50): inclusion HbT (uM), truth 42", "42",
                   lambda m: m["region1_hbt_uM"]),
    "homogeneous_off_level": ("homogeneous off-level tissue: max |bias| of HbO/Hb/water", "0 %",
                              lambda m: m["max_abs_bias"]),
    "two_inclusions": ("two inclusions: HbT (uM), truth 31.5 / 52.5", "31.5 / 52.5",
                       lambda m: m["region1_hbt_uM"]),
}


def _headline_text(case: str, metrics: Dict[str, float]) -> str:
    value = HEADLINE[case][2](metrics)
    if case == "homogeneous_off_level":
        return f"{100 * value:.1f} %"
    if case == "two_inclusions":
        return f"{metrics['region1_hbt_uM']:.1f} / {metrics['region2_hbt_uM']:.1f}"
    return f"{value:.3g}" if case != "standard" and case != "bright_mri" else f"{value:.1f}"


def markdown_table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Case x method table of the headline read-outs."""
    methods = list(next(iter(results.values())).keys()) if results else []
    lines = ["| case | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for case, per_method in results.items():
        lines.append(f"| {HEADLINE[case][0]} | " + " | ".join(_headline_text(case, per_method[m]) for m in methods)
                     + " |")
    return "\n".join(lines)


def shipping_check(results: Dict[str, Dict[str, Dict[str, float]]], candidate: str,
                   reference: str = "DRI") -> Dict[str, Any]:
    """Whether ``candidate`` neither invents nor misses lesions worse than ``reference`` by the margins."""
    invented = {m: abs(results["mri_only"][m]["region1_hbt_contrast"] - 1.0) for m in (candidate, reference)}
    missed = {m: abs(results["optics_only"][m]["region1_hbt_contrast"] - 2.0) for m in (candidate, reference)}
    ok_invented = invented[candidate] <= invented[reference] + MRI_ONLY_MARGIN
    ok_missed = missed[candidate] <= missed[reference] + OPTICS_ONLY_MARGIN
    return {"candidate": candidate, "reference": reference, "invented_error": invented, "missed_error": missed,
            "mri_only_margin": MRI_ONLY_MARGIN, "optics_only_margin": OPTICS_ONLY_MARGIN,
            "mri_only_ok": bool(ok_invented), "optics_only_ok": bool(ok_missed), "passes": bool(ok_invented and ok_missed)}


def robustness_evaluation(networks: Dict[str, Any], out_dir: Optional[Path | str] = None, with_dri: bool = True,
                          cases: Sequence[str] = CASE_NAMES, seed: int = 0, device: DeviceLike = None,
                          dri_element_size_mm: float = 2.5, workers: Optional[int] = 1,
                          log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run the cases through ``networks`` ({label: checkpoint path or Reconstructor}) and DRI.

    Returns ``{"results": {case: {method: metrics}}, "markdown": str, "checks": [...]}`` and, with
    ``out_dir``, writes ``robustness.md`` and ``robustness.json`` there.
    """
    from .recon import Reconstructor, load_reconstructor

    say = log or (lambda line: None)
    case_list = robustness_cases(cases, seed)
    measurements = simulate_cases(case_list, seed)
    mri = np.stack([c["mri"] for c in case_list])
    recons: Dict[str, np.ndarray] = {}
    for label, network in networks.items():
        rec = network if isinstance(network, Reconstructor) else load_reconstructor(network, device)
        recons[label] = rec.reconstruct_batch(measurements, mri)
    if with_dri:
        reference = reference_amplitudes(REFERENCE_VALUES, 16, 1.0)
        recons["DRI"] = run_dri(measurements, mri, reference, 16, dri_element_size_mm, workers)
    results = {case["name"]: {label: case_metrics(case, maps[i]) for label, maps in recons.items()}
               for i, case in enumerate(case_list)}
    checks = []
    if with_dri and "mri_only" in results and "optics_only" in results:
        checks = [shipping_check(results, label) for label in networks]
    text = markdown_table(results)
    for check in checks:
        text += (f"\n\n{check['candidate']}: |invented - 1| {check['invented_error'][check['candidate']]:.3f} vs DRI "
                 f"{check['invented_error']['DRI']:.3f} (+{MRI_ONLY_MARGIN} allowed), |recovered - 2| "
                 f"{check['missed_error'][check['candidate']]:.3f} vs DRI {check['missed_error']['DRI']:.3f} "
                 f"(+{OPTICS_ONLY_MARGIN} allowed): {'passes' if check['passes'] else 'FAILS'}")
    say(text)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "robustness.md").write_text(text + "\n")
        (out / "robustness.json").write_text(json.dumps({"results": results, "checks": checks, "seed": seed,
                                                         "cases": list(cases)}, indent=1))
    return {"results": results, "markdown": text, "checks": checks, "maps": recons}
