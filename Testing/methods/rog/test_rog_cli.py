"""``deepimaging rog plan | train | predict | evaluate`` end to end on tiny data, and its error exits."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.cli import main
from deepimaging.core.checkpoint import load_checkpoint, make_header, save_checkpoint
from deepimaging.core.image import Image
from deepimaging.core.imageio import read_image, write_image
from deepimaging.core.segfile import read_segmentation
from deepimaging.rog.synthetic import make_blob_case


def test_plan_verb_writes_a_plan(blob_root, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["rog", "plan", "--data", str(blob_root), "--out", str(out), "--memory-gb", "1"]) == 0
    plan = json.loads(out.read_text())
    assert [lb["name"] for lb in plan["labels"]] == ["background", "liver", "kidney"]
    assert plan["channels"][0]["normalization"] == "clip_zscore" and plan["memory_budget_bytes"] == 2 ** 30
    assert "wrote" in capsys.readouterr().out
    pairs = sorted((blob_root / "imagesTr").glob("*.nii.gz"))[:2]
    labels = [blob_root / "labelsTr" / p.name for p in pairs]
    listed = tmp_path / "listed.json"
    assert main(["rog", "plan", "--images", *map(str, pairs), "--labels", *map(str, labels),
                 "--label-names", "1=liver", "2=liver tumour", "--modality", "MR", "--out", str(listed)]) == 0
    kinds = {lb["name"]: lb["kind"] for lb in json.loads(listed.read_text())["labels"]}
    assert kinds == {"background": "background", "liver": "organ", "liver tumour": "lesion"}


def test_train_predict_evaluate_end_to_end(blob_root, blob_plan, trained, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(blob_plan.to_dict()))
    run = tmp_path / "run"
    assert main(["rog", "train", "--data", str(blob_root), "--plan", str(plan_file), "--out", str(run),
                 "--epochs", "1", "--steps-per-epoch", "2", "--no-augment", "--device", "cpu", "--threads", "1"]) == 0
    assert "trained 1 epoch(s)" in capsys.readouterr().out
    assert load_checkpoint(run / "best.pt", method="rog").header["training"]["steps_per_epoch"] == 2

    # predict with the (better) shared fixture model: one file -> .seg.nrrd, and a label map
    images, truths = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truths.mkdir()
    for i, spacing in enumerate([(1.0, 1.0, 1.0), (1.2, 0.9, 1.1)]):
        image, truth = make_blob_case((36, 40, 38), spacing=spacing, seed=50 + i)
        write_image(image, images / f"case{i}.nii.gz")
        write_image(truth, truths / f"case{i}.nii.gz")
    seg_file = tmp_path / "case0.seg.nrrd"
    assert main(["rog", "predict", "--model", str(trained.best_path), "--image", str(images / "case0.nii.gz"),
                 "--out", str(seg_file), "--probabilities", str(tmp_path / "probs.nii.gz"), "--device", "cpu"]) == 0
    seg = read_segmentation(seg_file)
    assert seg.names() == ["liver", "kidney"]
    seg.geometry.require_same_grid(read_image(images / "case0.nii.gz"))
    probs = sitk.ReadImage(str(tmp_path / "probs.nii.gz"))
    assert probs.GetDimension() == 4 and probs.GetSize()[3] == 3

    preds = tmp_path / "preds"
    assert main(["rog", "predict", "--model", str(trained.best_path), "--image", str(images), "--out", str(preds),
                 "--format", ".nii.gz", "--device", "cpu"]) == 0
    label_map = read_image(preds / "case1.nii.gz")
    assert set(np.unique(label_map.array)) <= {0, 1, 2}
    capsys.readouterr()

    scores = tmp_path / "scores.json"
    assert main(["rog", "evaluate", "--pred", str(preds), "--labels", str(truths),
                 "--model", str(trained.best_path), "--out", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert "2 case(s)" in printed and "liver" in printed and "HD95" in printed
    assert "mean foreground Dice per case" in printed
    assert set(json.loads(scores.read_text())["foreground_dice"]) == {"case0", "case1"}
    summary = json.loads(scores.read_text())["summary"]
    assert summary["liver"]["dice_mean"] > 0.7 and summary["liver"]["cases"] == 2
    assert np.isfinite(summary["liver"]["hd95_mean_mm"])
    # a .seg.nrrd prediction is matched to its reference by segment name
    csv_out = tmp_path / "scores.csv"
    assert main(["rog", "evaluate", "--pred", str(seg_file), "--labels", str(truths / "case0.nii.gz"),
                 "--plan", str(plan_file), "--out", str(csv_out)]) == 0
    rows = csv_out.read_text().strip().splitlines()
    assert rows[0] == "case,label,value,dice,hd95_mm" and len(rows) == 3


def test_cli_errors_exit_cleanly(blob_root, blob_plan, tmp_path, capsys):
    other = tmp_path / "other.pt"
    save_checkpoint(other, {}, make_header("nirst", {}))
    image, _ = make_blob_case((20, 20, 20))
    write_image(image, tmp_path / "img.nii.gz")
    assert main(["rog", "predict", "--model", str(other), "--image", str(tmp_path / "img.nii.gz"),
                 "--out", str(tmp_path / "out.seg.nrrd")]) == 2
    assert "'nirst'" in capsys.readouterr().err
    assert main(["rog", "plan", "--out", str(tmp_path / "p.json")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["rog", "plan", "--images", str(tmp_path / "img.nii.gz"), "--out", str(tmp_path / "p.json")]) == 2
    assert "one file per image" in capsys.readouterr().err
    assert main(["rog", "plan", "--data", str(blob_root), "--label-names", "liver",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "1=liver" in capsys.readouterr().err
    # a real ROG checkpoint, but volumes it cannot take: 2-D, and 4-D (three volumes for a 1-channel model)
    model = blob_plan.build_model()
    rog = save_checkpoint(tmp_path / "rog.pt", model.state_dict(),
                          make_header("rog", model.config(), preprocessing=blob_plan.to_dict()))
    write_image(Image(np.zeros((24, 24), np.float32)), tmp_path / "flat.nii.gz")
    vol = sitk.ReadImage(str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([vol, vol, vol]), str(tmp_path / "four.nii.gz"))
    for name, message in (("flat.nii.gz", "2-D"), ("four.nii.gz", "expects 1 channel")):
        assert main(["rog", "predict", "--model", str(rog), "--image", str(tmp_path / name),
                     "--out", str(tmp_path / "out.seg.nrrd")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.seg.nrrd").exists()
    with pytest.raises(SystemExit):
        main(["rog", "predict", "--model", str(other)])  # argparse: --image and --out are required
