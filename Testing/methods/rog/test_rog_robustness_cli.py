"""`deepimaging robustness evaluate` on a ROG checkpoint: held-out case discovery, eps units,
the report's interface (scripts depend on robustness.json's keys) and bad input."""

import json
import math
import shutil

import pytest

from deepimaging.cli import main
from deepimaging.core.checkpoint import load_checkpoint, save_checkpoint
from deepimaging.core.errors import InputError
from deepimaging.robustness.rog import eps_fractions, held_out_cases


@pytest.fixture(scope="module")
def test_split(blob_root, tmp_path_factory):
    """The blob dataset with its last case moved to imagesTs/labelsTs (MSD names)."""
    root = tmp_path_factory.mktemp("split") / "Blobs"
    shutil.copytree(blob_root, root)
    label = sorted((root / "labelsTr").iterdir())[-1]
    for folder, file in (("imagesTs", root / "imagesTr" / label.name), ("labelsTs", label)):
        (root / folder).mkdir(exist_ok=True)
        shutil.copy(file, root / folder / label.name)
    return root


@pytest.fixture(scope="module")
def one_window_model(tiny_run, tiny_plan, tmp_path_factory):
    """The tiny run's weights with a patch covering a whole 40^3 case: one window per forward pass
    (the network is fully convolutional), so attack iterations stay cheap."""
    checkpoint = load_checkpoint(tiny_run.best_path, "rog")
    header = dict(checkpoint.header)
    header["preprocessing"] = dict(header["preprocessing"])
    header["preprocessing"]["patch_size"] = [math.ceil(44 / t) * t for t in tiny_plan.total_stride]
    return save_checkpoint(tmp_path_factory.mktemp("one_window") / "best.pt", checkpoint.state_dict, header)


def test_held_out_cases_prefer_labelled_test_cases(blob_root, test_split):
    cases, which = held_out_cases(test_split)
    assert which == "test" and len(cases) == 1 and cases[0].images[0].parent.name == "imagesTs"
    cases, which = held_out_cases(blob_root)
    assert which == "training" and len(cases) == 4


def test_eps_units(tiny_plan):
    assert eps_fractions([0, 8], "range", tiny_plan) == ([0.0, 8 / 255], "range")
    values, scale = eps_fractions([10.0], "intensity", tiny_plan)
    assert scale == "absolute" and values[0] == pytest.approx(10.0 / tiny_plan.channels[0].std, rel=1e-6)
    with pytest.raises(InputError, match="non-negative"):
        eps_fractions([-1], "range", tiny_plan)
    with pytest.raises(InputError, match="units"):
        eps_fractions([1], "percent", tiny_plan)


def test_cli_writes_the_report_scripts_read(one_window_model, test_split, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["robustness", "evaluate", "--model", str(one_window_model), "--data", str(test_split),
                 "--out", str(out), "--eps", "0,16", "--attacks", "pgd,apgd-ce,square", "--iterations", "2",
                 "--queries", "8", "--device", "cpu", "--no-plot"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "robustness.json").read_text())
    assert {"eps", "clean_dice", "attacks", "robust_dice", "auc"} <= set(data)
    assert data["eps"] == pytest.approx([0.0, 16 / 255]) and list(data["attacks"]) == ["pgd", "apgd-ce", "square"]
    assert data["robust_dice"][0] == pytest.approx(data["clean_dice"])
    assert data["robust_dice"][1] <= data["robust_dice"][0] + 1e-9
    assert data["settings"]["case_set"] == "test" and data["settings"]["eps_units"] == "range"
    assert (out / "robustness.md").read_text().count("|") > 10
    assert "robust Dice per eps" in capsys.readouterr().out


def test_cli_bad_input(tiny_run, blob_root, tmp_path, capsys):
    base = ["robustness", "evaluate", "--model", str(tiny_run.best_path), "--data", str(blob_root),
            "--out", str(tmp_path / "r")]
    assert main(base + ["--attacks", "pgd,cw"]) == 2 and "unknown attack" in capsys.readouterr().err
    assert main(base + ["--eps", "a,b"]) == 2 and "comma-separated numbers" in capsys.readouterr().err
    assert main(base[:5] + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "robustness.json").exists()
