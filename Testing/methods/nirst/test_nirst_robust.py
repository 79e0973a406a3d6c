"""The robust phantom distribution (issue #11) and the held-out robustness evaluation."""

import numpy as np
import pytest
import torch

from deepimaging.nirst import load_dataset, make_phantom, save_dataset, simulate_phantoms
from deepimaging.nirst.phantoms import BACKGROUND_LEVELS, CHROMOPHORES
from deepimaging.nirst.robust_phantoms import BACKGROUND_RANGES
from deepimaging.nirst.robustness_eval import (CASE_NAMES, case_metrics, markdown_table, robustness_cases,
                                               robustness_evaluation, shipping_check)
from deepimaging.nirst.simulate import PHANTOM_KINDS

RADIUS = 41.0


@pytest.fixture(scope="module")
def robust():
    return [make_phantom(i, seed=5, distribution="robust") for i in range(300)]


def _region_masks(phantom):
    size = phantom.maps.shape[-1]
    centres = (np.arange(size) + 0.5) * (2 * RADIUS / size) - RADIUS
    x, y = np.meshgrid(centres, centres)
    return [np.hypot(x - c[0], y - c[1]) < 0.5 * d for c, d in zip(phantom.centres_mm, phantom.diameters_mm)]


def test_kinds_have_their_share_and_properties(robust):
    kinds = [p.kind for p in robust]
    assert 0.6 < kinds.count("both") / 300 < 0.8
    assert 0.08 < kinds.count("mri_only") / 300 < 0.22 and 0.08 < kinds.count("optics_only") / 300 < 0.22
    for phantom in robust:
        same_optics = [np.allclose(v, phantom.background) for v in phantom.inclusion_values]
        invisible = [r == 1.0 for r in phantom.mri_ratio]
        if phantom.kind == "mri_only":  # optics homogeneous in one inclusion, the MRI shows it
            assert sum(same_optics) == 1 and not any(invisible)
        elif phantom.kind == "optics_only":  # MRI flat over one inclusion, the optics have contrast
            assert sum(invisible) == 1 and not any(same_optics)
        else:
            assert not any(invisible) and not any(same_optics)
        # Fully inside the disk.
        assert np.all(np.hypot(*phantom.centres_mm.T) + 0.5 * phantom.diameters_mm <= RADIUS + 1e-9)


def test_mri_only_and_optics_only_images(robust):
    mri_only = next(p for p in robust if p.kind == "mri_only" and len(p.diameters_mm) == 1)
    optics_only = next(p for p in robust if p.kind == "optics_only" and len(p.diameters_mm) == 1)
    region = _region_masks(mri_only)[0]
    disk = mri_only.maps[2] > 0
    assert np.allclose(mri_only.maps[:, region].mean(axis=1), mri_only.background, rtol=1e-5)
    inside, outside = np.median(mri_only.mri[region]), np.median(mri_only.mri[disk & ~region])
    assert abs(inside / outside - 1.0) > 0.1  # visible in the MRI
    region = _region_masks(optics_only)[0]
    disk = optics_only.maps[2] > 0
    inside, outside = np.median(optics_only.mri[region]), np.median(optics_only.mri[disk & ~region])
    assert abs(inside / outside - 1.0) < 0.15  # only bias/texture, no lesion contrast
    assert not np.allclose(optics_only.maps[:, region].mean(axis=1), optics_only.background, rtol=1e-3)


def test_values_are_continuous_and_cover_the_paper_levels(robust):
    backgrounds = np.array([p.background for p in robust])
    for c, name in enumerate(CHROMOPHORES):
        levels = np.array(BACKGROUND_LEVELS[name])
        off_level = np.min(np.abs(backgrounds[:, c, None] - levels[None]), axis=1) > 1e-6
        assert off_level.all()
        assert len(np.unique(backgrounds[:, c])) == len(robust)
        low, high = BACKGROUND_RANGES[name]
        assert low <= backgrounds[:, c].min() and backgrounds[:, c].max() <= high
        assert low <= levels.min() and levels.max() <= high


def test_mri_contrast_varies_and_is_decoupled_from_optics(robust):
    ratios = np.concatenate([p.mri_ratio[p.mri_ratio != 1.0] for p in robust])
    assert (ratios < 1).mean() > 0.15 and (ratios > 1).mean() > 0.5 and ratios.std() > 0.3
    greys = [np.median(p.mri[p.maps[2] > 0]) for p in robust]
    assert np.std(greys) > 10  # background grey level varies
    hbt_contrast = [p.inclusion_values[0, :2].sum() / p.background[:2].sum() for p in robust if p.kind == "both"]
    ratio = [p.mri_ratio[0] for p in robust if p.kind == "both"]
    assert abs(np.corrcoef(hbt_contrast, ratio)[0, 1]) < 0.2


def test_paper_distribution_unchanged_and_robust_dataset_roundtrip(tmp_path):
    paper = make_phantom(3, seed=11)
    assert paper.kind == "paper" and all(v in BACKGROUND_LEVELS["HbO"] for v in paper.background[:1])
    data = simulate_phantoms(6, seed=2, workers=1, element_size_mm=3.0, distribution="robust")
    assert data["meta"]["distribution"] == "robust"
    assert data["phantom_kind"].shape == (6,) and data["inclusion_mri_ratio"].shape == (6, 2)
    again = make_phantom(0, seed=2, distribution="robust")
    assert np.array_equal(data["maps"][0], again.maps)
    assert PHANTOM_KINDS[int(data["phantom_kind"][0])] == again.kind
    path = save_dataset(tmp_path / "robust.npz", data)
    loaded = load_dataset(path)
    assert loaded["meta"]["distribution"] == "robust" and np.array_equal(loaded["phantom_kind"], data["phantom_kind"])
    with pytest.raises(ValueError, match="distribution"):
        make_phantom(0, distribution="nonsense")


def test_case_metrics_are_exact_on_the_truth():
    cases = robustness_cases()
    assert [c["name"] for c in cases] == list(CASE_NAMES)
    metrics = {c["name"]: case_metrics(c, c["maps"]) for c in cases}
    assert metrics["mri_only"]["region1_hbt_contrast"] == pytest.approx(1.0)
    assert metrics["optics_only"]["region1_hbt_contrast"] == pytest.approx(2.0)
    assert metrics["bright_mri"]["region1_hbt_uM"] == pytest.approx(42.0)
    assert metrics["homogeneous_off_level"]["max_abs_bias"] == pytest.approx(0.0, abs=1e-6)
    two = metrics["two_inclusions"]
    assert (two["region1_hbt_uM"], two["region2_hbt_uM"]) == (pytest.approx(31.5), pytest.approx(52.5))
    mri = {c["name"]: c["mri"] for c in cases}
    region = cases[1]["regions"][0]
    assert mri["mri_only"][region].mean() > 1.4 * mri["mri_only"][cases[1]["far"]].mean()
    results = {name: {"A": m, "B": m} for name, m in metrics.items()}
    assert "| case | A | B |" in markdown_table(results)
    check = shipping_check(results, "A", reference="B")
    assert check["passes"] and check["invented_error"]["A"] == pytest.approx(0.0, abs=1e-6)


def test_robustness_evaluation_on_two_cases(tmp_path):
    torch.set_num_threads(1)
    out = robustness_evaluation({"Z-Net": None}, out_dir=tmp_path, with_dri=False,
                                cases=("mri_only", "optics_only"), device="cpu")
    results = out["results"]
    assert set(results) == {"mri_only", "optics_only"} and set(results["mri_only"]) == {"Z-Net"}
    for per_method in results.values():
        assert all(np.isfinite(v) for v in per_method["Z-Net"].values())
    assert out["maps"]["Z-Net"].shape == (2, 3, 100, 100)
    assert (tmp_path / "robustness.md").is_file() and (tmp_path / "robustness.json").is_file()


def test_cli_robust_simulation_and_robustness_evaluation(tmp_path, capsys):
    from deepimaging.cli import main

    torch.set_num_threads(1)
    assert main(["nirst", "simulate", "--n", "4", "--workers", "1", "--element-size", "3", "--distribution",
                 "robust", "--out", str(tmp_path / "data")]) == 0
    shard = next((tmp_path / "data").glob("nirst-robust-seed0-*.npz"))
    assert load_dataset(shard)["meta"]["distribution"] == "robust"
    assert main(["nirst", "evaluate", "--robustness", "--no-dri", "--device", "cpu", "--out", str(tmp_path / "rob")]) == 0
    text = (tmp_path / "rob" / "robustness.md").read_text()
    assert "MRI-only lesion" in text and "optics-only lesion" in text and "| Z-Net (robust training) |" in text
