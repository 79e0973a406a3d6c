import collections
import pathlib

import pytest
import torch

from deepimaging.core.checkpoint import load_checkpoint, make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError


@pytest.fixture
def ckpt(tmp_path):
    model = torch.nn.Linear(3, 2)
    header = make_header("levelset", {"layers": 1}, preprocessing={"spacing": [1, 1, 1]},
                         labels={"1": "blob"}, metrics={"dice": 0.9})
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), header, extra_tensors={"mean": torch.ones(2)})
    return path, model


def test_roundtrip(ckpt):
    path, model = ckpt
    loaded = load_checkpoint(path, method="levelset")
    assert loaded.method == "levelset" and loaded.config == {"layers": 1}
    assert loaded.header["labels"] == {"1": "blob"} and "package_version" in loaded.header
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict[k], v)
    assert torch.equal(loaded.extra_tensors["mean"], torch.ones(2))


def test_wrong_method(ckpt):
    with pytest.raises(CheckpointError, match="'levelset'.*'rog'"):
        load_checkpoint(ckpt[0], method="rog")


def test_truncated_file(ckpt, tmp_path):
    data = ckpt[0].read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(bad)


def test_foreign_file_and_pickled_objects_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "obj": collections.OrderedDict, "f": pathlib.PurePosixPath("x")}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickle.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "plain.pt")


def test_missing_file_and_unserialisable_header(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "x.pt", {}, {"method": "m", "bad": object()})
    assert not (tmp_path / "x.pt").exists()


def test_foreign_pickle_never_gets_torchs_weights_only_advice(tmp_path):
    """torch's message suggests weights_only=False (it would run arbitrary code): users never see it."""
    import pickle

    path = tmp_path / "object.pt"
    path.write_bytes(pickle.dumps({"model": CheckpointError("x")}))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    text = str(caught.value)
    assert "weights_only" not in text and "not a file of tensors and plain data" in text
    assert caught.value.__cause__ is None and caught.value.__context__ is None
