"""CLI/loader fixes: plan --out FOLDER, --label-kinds, plain errors for non-checkpoints, train --free-at --init-from."""

import json
import pickle
import warnings
import zipfile
from fractions import Fraction

import pytest
import torch

from deepimaging.cli import main
from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.errors import CheckpointError
from deepimaging.rog.infer import load_rog


def _two_cases(blob_root):
    images = sorted((blob_root / "imagesTr").glob("*.nii.gz"))[:2]
    labels = [blob_root / "labelsTr" / p.name for p in images]
    return ["--images", *map(str, images), "--labels", *map(str, labels)]


def test_plan_out_folder_and_label_kinds(blob_root, tmp_path, capsys):
    existing = tmp_path / "plans"
    existing.mkdir()
    args = ["rog", "plan", *_two_cases(blob_root), "--label-names", "1=liver", "2=liver tumour"]
    assert main([*args, "--out", str(existing)]) == 0
    kinds = {lb["name"]: lb["kind"] for lb in json.loads((existing / "plan.json").read_text())["labels"]}
    assert kinds == {"background": "background", "liver": "organ", "liver tumour": "lesion"}
    assert main([*args, "--out", str(tmp_path / "new") + "/", "--label-kinds", "1=lesion,2=organ"]) == 0
    kinds = {lb["name"]: lb["kind"] for lb in json.loads((tmp_path / "new" / "plan.json").read_text())["labels"]}
    assert kinds == {"background": "background", "liver": "lesion", "liver tumour": "organ"}
    assert str(tmp_path / "new" / "plan.json") in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "p.json"), "--label-kinds", "1=organ", "2=lesion"]) == 0
    for bad, message in (("1=tumour", "1=organ or 2=lesion"), ("7=organ", "not labels of the dataset")):
        assert main([*args, "--out", str(tmp_path / "bad.json"), "--label-kinds", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def _not_checkpoints(folder):
    (folder / "notes.pt").write_text("hello\nnot a checkpoint\n")
    (folder / "dict.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (folder / "object.pkl").write_bytes(pickle.dumps({"x": Fraction(1, 3)}))
    with zipfile.ZipFile(folder / "archive.zip", "w") as z:
        z.writestr("readme.txt", "not a model")
    torch.save({"x": Fraction(1, 2)}, folder / "torch_object.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "bytes.pt").write_bytes(bytes(range(256)))
    return sorted(p for p in folder.iterdir() if p.is_file())


def test_non_checkpoints_give_a_plain_message(tmp_path, capsys):
    files = _not_checkpoints(tmp_path)
    assert len(files) == 7
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's own warnings stay silent too
            with pytest.raises(CheckpointError) as info:
                load_rog(path)
        text = str(info.value)
        chained = str(info.value.__cause__ or "") + str(info.value.__context__ or "")
        assert text.startswith(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
                               "deepimaging checkpoint ("), text
        for advice in ("weights_only", "weights only", "trust", "PyTorch 2.6"):
            assert advice.lower() not in (text + chained).lower(), (path.name, text)
    assert main(["rog", "predict", "--model", str(tmp_path / "object.pkl"), "--image", str(tmp_path / "x.nii.gz"),
                 "--out", str(tmp_path / "out.seg.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "(not a file of tensors and plain data" in err and "weights_only" not in err
    assert main(["rog", "evaluate", "--pred", str(tmp_path / "notes.pt"), "--labels", str(tmp_path / "notes.pt"),
                 "--model", str(tmp_path / "notes.pt")]) == 2
    assert "(it is not a PyTorch file)" in capsys.readouterr().err


def test_train_free_at_fine_tuning_from_the_cli(blob_root, tiny_plan, tiny_run, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(tiny_plan.to_dict()))
    out = tmp_path / "free"
    assert main(["rog", "train", "--data", str(blob_root), "--plan", str(plan_file), "--out", str(out),
                 "--epochs", "1", "--steps-per-epoch", "4", "--no-augment", "--device", "cpu", "--threads", "1",
                 "--free-at", "--free-at-eps", "4", "--free-at-replays", "2",
                 "--init-from", str(tiny_run.best_path)]) == 0
    printed = capsys.readouterr().out
    assert "trained 1 epoch(s) with Free AT" in printed
    assert "an epoch was 4 step(s); one pass over the training cases (the reference code's epoch) is 2" in printed
    training = load_checkpoint(out / "last.pt", method="rog").header["training"]
    assert training["free_at"] is True and training["free_at_replays"] == 2
    assert training["free_at_eps"] == pytest.approx(4 / 255)
    assert training["init_from"] == str(tiny_run.best_path) and training["steps_per_epoch"] == 4


def test_planner_label_kinds_override_and_validation(blob_root):
    from deepimaging.core.errors import InputError
    from deepimaging.rog.plan import DatasetSpec, plan_dataset

    images = sorted((blob_root / "imagesTr").glob("*.nii.gz"))[:2]
    spec = DatasetSpec([((p,), blob_root / "labelsTr" / p.name) for p in images], {0: "background", 1: "liver",
                                                                                   2: "kidney"})
    kinds = {lb.name: lb.kind for lb in plan_dataset(spec, label_kinds={2: "lesion"}).labels}
    assert kinds == {"background": "background", "liver": "organ", "kidney": "lesion"}
    lesion = next(lb for lb in plan_dataset(spec, label_kinds={2: "lesion"}).labels if lb.value == 2)
    assert lesion.min_size_mm3 == lesion.smallest_component_mm3 > 0  # the lesion rule is configured
    spec.label_kinds = {1: "lesion"}  # what --label-kinds sets
    assert plan_dataset(spec).labels[1].kind == "lesion"
    for bad, message in (({5: "organ"}, "not labels"), ({1: "background"}, "not allowed"),
                         ({2: "tumour"}, "not allowed")):
        with pytest.raises(InputError, match=message):
            plan_dataset(spec, label_kinds=bad)
