import textwrap

import pytest
import torch

from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.distributed import DistContext, all_reduce_mean, init_distributed, rank_seed, wrap_model
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.core.training import TrainingRun, format_seconds
from torchrun import run_two_ranks


def fit_line(run: TrainingRun, model, opt, epochs_now):
    x = torch.linspace(-1, 1, 32)[:, None]
    y = 3 * x + 1
    for _ in range(epochs_now):
        run.check_cancel()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.report_step(1.0, f"loss {loss.item():.3f}")
        run.end_epoch(model, {"loss": loss.item()}, loss.item(), optimizer=opt)
    return loss.item()


def test_best_last_and_resume(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    seen = []
    run = TrainingRun(tmp_path, {"method": "toy", "config": {}}, epochs=10, higher_is_better=False,
                      progress=lambda f, m: seen.append((f, m)))
    first = fit_line(run, model, opt, 4)
    assert run.last_path.is_file() and run.best_path.is_file()
    assert load_checkpoint(run.last_path).training_state["epoch"] == 4
    assert any("ETA" in m for _, m in seen)

    model2 = torch.nn.Linear(1, 1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    run2 = TrainingRun(tmp_path, {"method": "toy", "config": {}}, epochs=10, higher_is_better=False)
    assert run2.resume(model2, opt2)
    assert run2.epoch == 4 and len(run2.history) == 4
    assert torch.equal(model2.weight, model.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    last = fit_line(run2, model2, opt2, 6)
    assert run2.finished and last < first
    assert load_checkpoint(run2.best_path).header["metrics"]["loss"] == pytest.approx(run2.best_metric)


def test_cancel_stops_training(tmp_path):
    token = CancelToken()
    token.cancel()
    run = TrainingRun(tmp_path, {"method": "toy"}, epochs=3, cancel=token)
    with pytest.raises(Cancelled):
        fit_line(run, torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), 1)


def test_single_process_context(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model
    assert all_reduce_mean(3.0, ctx) == 3.0
    assert rank_seed(5, DistContext(rank=1)) != rank_seed(5, DistContext(rank=0))


def test_format_seconds():
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05"
    assert format_seconds(float("inf")) == "?"


SCRIPT = textwrap.dedent('''
    import sys, torch
    from deepimaging.core.distributed import (init_distributed, wrap_model, all_reduce_mean, all_reduce_sum,
                                              all_gather_objects, rank_seed, shutdown)
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    model = wrap_model(torch.nn.Linear(4, 1), ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank_seed(1, ctx))
    for _ in range(5):
        x = torch.randn(8, 4, generator=g)  # each rank its own data
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    mean = all_reduce_mean(float(ctx.rank), ctx)
    total = all_reduce_sum(torch.tensor([1.0, float(ctx.rank)]), ctx)
    names = all_gather_objects(f"rank-{ctx.rank}", ctx)
    torch.save({"w": model.module.weight.detach(), "mean": mean, "world": ctx.world_size, "total": total,
                "names": names}, sys.argv[1] + f"/rank{ctx.rank}.pt")
    shutdown(ctx)
''')


def test_two_process_ddp_ranks_end_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    proc = run_two_ranks([script, tmp_path], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == 2 and r0["mean"] == pytest.approx(0.5)
    assert r0["total"].tolist() == [2.0, 1.0] and r1["names"] == ["rank-0", "rank-1"]
    assert torch.equal(r0["w"], r1["w"])
