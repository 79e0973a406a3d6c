"""``deepimaging levelset synth | train | refine --model | evaluate`` on a tiny built-in folder."""

import json

import numpy as np
import pytest

from deepimaging.cli import main
from deepimaging.core.imageio import read_image
from deepimaging.core.segfile import read_segmentation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepcli")
    assert main(["levelset", "synth", "--out", str(root / "data"), "--dim", "2", "--n", "6", "--seed", "3", "--size", "48"]) == 0
    rc = main(["levelset", "train", "--data", str(root / "data"), "--out", str(root / "run"), "--dim", "2",
               "--epochs", "4", "--device", "cpu", "--steps-per-epoch", "8", "--batch-size", "4", "--grid", "32",
               "--widths", "8", "16", "--lr", "0.003"])
    assert rc == 0 and (root / "run" / "best.pt").is_file()
    return root


def test_refine_with_a_model_and_in_roi_mode(run, capsys):
    data, best = run / "data", run / "run" / "best.pt"
    image, mask = data / "images" / "case_00003.nrrd", data / "coarse" / "case_00003.nrrd"
    out = run / "refined.seg.nrrd"
    assert main(["levelset", "refine", "--model", str(best), "--image", str(image), "--mask", str(mask),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "3 learned steps" in capsys.readouterr().out
    seg = read_segmentation(out)
    assert seg.segment().mask.any() and seg.geometry.same_grid(read_image(image))
    truth = read_image(data / "masks" / "case_00003.nrrd").array > 0
    z, y, x = np.nonzero(truth)
    box = f"0,{y.min()},{x.min()},1,{y.max() + 1},{x.max() + 1}"
    out_roi = run / "roi.nrrd"
    assert main(["levelset", "refine", "--model", str(best), "--image", str(image), "--roi", box,
                 "--out", str(out_roi), "--device", "cpu"]) == 0
    assert read_image(out_roi).array.max() == 1


def test_refine_argument_rules(run, capsys):
    data = run / "data"
    image = str(data / "images" / "case_00003.nrrd")
    out = str(run / "never.nrrd")
    assert main(["levelset", "refine", "--image", image, "--out", out]) == 2
    assert "--mask is required" in capsys.readouterr().err
    assert main(["levelset", "refine", "--image", image, "--roi", "0,1,2,1,9,9", "--out", out]) == 2
    assert main(["levelset", "refine", "--model", str(run / "run" / "best.pt"), "--image", image,
                 "--roi", "0,1,2", "--out", out]) == 2
    assert "six integers" in capsys.readouterr().err
    assert not (run / "never.nrrd").exists()


def test_evaluate_writes_the_report(run, capsys):
    out = run / "eval"
    assert main(["levelset", "evaluate", "--model", str(run / "run" / "best.pt"), "--data", str(run / "data"),
                 "--out", str(out), "--device", "cpu", "--no-timing"]) == 0
    assert "classic Chan-Vese" in capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text())
    assert result["cases"] == 6 and "learned" in result["methods"] and (out / "evaluation.png").is_file()
