"""Shared ROG fixtures: one synthetic blob dataset, its CPU-friendly plan and one short training run."""

import pytest
import torch

from deepimaging.rog.plan import plan_dataset
from deepimaging.rog.synthetic import cpu_friendly, write_blob_dataset
from deepimaging.rog.train import train_rog


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """ROG's small 3D depthwise convolutions run fastest single-threaded on a small CPU box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def blob_root(tmp_path_factory):
    """Four 40^3 CT-like volumes with two blob organs, MSD layout."""
    return write_blob_dataset(tmp_path_factory.mktemp("rog") / "Blobs", cases=4, shape=(40, 40, 40))


@pytest.fixture(scope="session")
def blob_plan(blob_root):
    return cpu_friendly(plan_dataset(blob_root), (32, 32, 32))


@pytest.fixture(scope="session")
def trained(blob_root, blob_plan, tmp_path_factory):
    """A short real training run (6 epochs x 12 steps of batch 2); also the learning test's subject."""
    return train_rog(blob_root, tmp_path_factory.mktemp("rog_run"), 6, plan=blob_plan, steps_per_epoch=12,
                     device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_plan(blob_plan):
    """The blob plan with a 16x16x32 patch: about 0.1 s per training step on one CPU thread."""
    return cpu_friendly(blob_plan, (16, 16, 32))


@pytest.fixture(scope="session")
def tiny_dataset(blob_root, tiny_plan):
    from deepimaging.rog.data import RogDataset

    return RogDataset.from_files(blob_root, tiny_plan)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tiny_plan, tmp_path_factory):
    """A clean 2-epoch x 6-step run on the tiny plan: a checkpoint to fine-tune from."""
    return train_rog(tiny_dataset, tmp_path_factory.mktemp("rog_tiny"), 2, plan=tiny_plan, steps_per_epoch=6,
                     device="cpu", augmentation=None, seed=1)
