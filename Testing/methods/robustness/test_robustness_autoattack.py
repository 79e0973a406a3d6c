"""The AutoAttack benchmark for segmentation and its reports (tiny hand-built models, CPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.robustness import (GradientMaskingError, markdown_table, normalised_auc, run_autoattack,
                                    write_report)


class Bands(nn.Module):
    """Hand-built 3D segmenter: logits_k = -gain (s(x) - k)^2, s = centre-weighted smoothing."""

    def __init__(self, num_classes: int = 3, gain: float = 4.0) -> None:
        super().__init__()
        kernel = torch.full((3, 3, 3), 0.4 / 26)
        kernel[1, 1, 1] = 0.6
        self.register_buffer("kernel", kernel[None, None])
        self.register_buffer("levels", torch.arange(num_classes, dtype=torch.float32).reshape(1, -1, 1, 1, 1))
        self.gain = gain

    def forward(self, x):
        return -self.gain * (F.conv3d(x.mean(dim=1, keepdim=True), self.kernel, padding=1) - self.levels) ** 2


class Constant(nn.Module):
    """Trivially robust: predicts class 1 everywhere whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0, -1.0]))

    def forward(self, x):
        return self.bias.reshape(1, 3, 1, 1, 1).expand(x.shape[0], 3, *x.shape[2:]) + 0 * x.sum()


def make_case(n: int = 10, radius: float = 0.4, num_classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - n / 2 + 0.5] * 3, indexing="ij")
    r = torch.stack(axes).pow(2).sum(0).sqrt()
    label = torch.zeros((n, n, n), dtype=torch.long)
    label[r < radius * n] = 1
    if num_classes > 2:
        label[r < radius * n / 2] = 2
    return label.float()[None] + 0.1 * torch.randn(1, n, n, n, generator=gen), label


RANGE = (-0.5, 2.5)
FAST = {"iterations": 4, "square_queries": 30}


@pytest.fixture(scope="module")
def cases():
    return [make_case(seed=i, radius=0.3 + 0.05 * i) for i in range(3)]


@pytest.fixture(scope="module")
def result(cases):
    return run_autoattack(Bands(), cases, [8 / 255, 24 / 255, 40 / 255], valid_range=RANGE, attacks=None, **FAST,
                          cascade=True, device="cpu")


def test_benchmark_schema_and_invariants(result, cases):
    assert list(result.attacks) == ["apgd-ce", "apgd-dlr", "fab-t", "square"]
    assert result.mode == "cascade" and result.num_classes == 3
    assert result.threshold == pytest.approx(result.clean_dice / 2)
    assert result.eps_abs[0] == pytest.approx([8 / 255 * 3.0])
    for ei in range(3):
        for ci in range(len(cases)):
            dices = [result.per_case[a][ei][ci] for a in result.attacks]
            worst = min([result.clean_dice_per_case[ci]] + [d for d in dices if d is not None])
            assert result.robust_dice_per_case[ei][ci] == pytest.approx(worst)
        assert result.robust_dice[ei] <= result.clean_dice
        assert result.attacks["square"][ei] == pytest.approx(result.robust_dice[ei])  # last stage of the cascade
        stages = [result.attacks[a][ei] for a in result.attacks]
        assert all(b <= a + 1e-9 for a, b in zip(stages, stages[1:]))  # cumulative robust Dice
    assert result.robust_dice[-1] < result.clean_dice - 0.2  # the attacks do break this model
    assert set(result.auc) == set(result.attacks)


def test_cascade_attacks_only_unbroken_cases(result):
    names = list(result.attacks)
    for ei in range(len(result.eps)):
        worst = list(result.clean_dice_per_case)
        for name in names:
            expected = [ci for ci, d in enumerate(worst)
                        if d >= result.threshold and result.clean_dice_per_case[ci] >= result.threshold]
            assert result.ran_on[name][ei] == expected
            for ci in expected:
                worst[ci] = min(worst[ci], result.per_case[name][ei][ci])


def test_broken_cases_are_skipped_by_later_attacks():
    cases = [make_case(seed=i) for i in range(3)]
    cases[0] = (cases[0][0], torch.zeros_like(cases[0][1]) + 2)  # reference all class 2: broken on the clean input
    seen = []

    def breaker(model, x, y, eps, **kw):  # breaks case 1 only (identified by its seed)
        return x + float(eps[0]) if kw["seed"] == 1009 else x.clone()

    def recorder(model, x, y, eps, **kw):
        seen.append(kw["seed"] // 1009)
        return x.clone()

    res = run_autoattack(Bands(), cases, [3.0], eps_scale="absolute", spatial_dims=3,
                         attacks=[("breaker", breaker), ("recorder", recorder), "apgd-ce"], iterations=2)
    assert res.clean_dice_per_case[0] < res.threshold
    assert res.ran_on["breaker"] == [[1, 2]] and res.ran_on["recorder"] == [[2]] and seen == [2]
    assert res.ran_on["apgd-ce"][0] in ([2], [])
    assert res.per_case["recorder"][0][1] is None
    indiv = run_autoattack(Bands(), cases, [3.0], eps_scale="absolute",
                           attacks=[("breaker", breaker), ("recorder", recorder)], cascade=False)
    assert indiv.ran_on["recorder"] == [[1, 2]] and indiv.mode == "individual"


def test_trivially_robust_model_keeps_clean_dice(cases):
    with pytest.raises(GradientMaskingError, match="case 0"):
        run_autoattack(Constant(), cases, [8 / 255], valid_range=RANGE, **FAST)
    with pytest.warns(RuntimeWarning, match="gradient masking"):
        res = run_autoattack(Constant(), cases, [8 / 255, 16 / 255], valid_range=RANGE, gradient_check="warn",
                             **FAST)
    assert res.robust_dice == pytest.approx([res.clean_dice, res.clean_dice])
    assert all(v == pytest.approx(res.clean_dice) for values in res.attacks.values() for v in values)
    assert any("gradient masking" in w for w in res.warnings)


def test_two_class_model_gets_targeted_ce_instead_of_dlr():
    cases = [make_case(num_classes=2, seed=i) for i in range(2)]
    res = run_autoattack(Bands(num_classes=2), cases, [16 / 255], valid_range=RANGE, **FAST)
    assert list(res.attacks) == ["apgd-ce", "apgd-t-ce", "fab-t", "square"]
    assert any("APGD-DLR needs >= 3 classes" in note for note in res.notes)


def test_warns_when_stronger_attack_is_weaker(cases):
    def lazy_apgd(model, x, y, eps, **kw):  # a "broken" APGD-CE that never moves
        return x.clone()

    with pytest.warns(RuntimeWarning, match="APGD-CE .* is weaker than PGD"):
        res = run_autoattack(Bands(), cases, [40 / 255], valid_range=RANGE, attacks=["pgd", ("apgd-ce", lazy_apgd)],
                             iterations=5)
    assert any("weaker than PGD" in w for w in res.warnings)
    assert res.attacks["pgd"][0] < res.clean_dice and "pgd" not in res.settings["gating_attacks"]


def test_pgd_comparison_does_not_warn_when_apgd_is_stronger(cases):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run_autoattack(Bands(), cases[:2], [40 / 255], valid_range=RANGE, attacks=["apgd-ce", "pgd"],
                             iterations=10)
    assert res.attacks["apgd-ce"][0] <= res.attacks["pgd"][0] + 0.01
    assert res.warnings == []


def test_report_files(result, tmp_path):
    paths = write_report(result, tmp_path / "out", stem="bench")
    data = json.loads(paths["json"].read_text())
    for key, kind in (("eps", list), ("clean_dice", float), ("attacks", dict), ("robust_dice", list), ("auc", dict)):
        assert isinstance(data[key], kind)
    assert all(len(v) == len(data["eps"]) for v in data["attacks"].values())
    assert len(data["robust_dice"]) == len(data["eps"]) and set(data["auc"]) == set(data["attacks"])
    md = paths["markdown"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| eps"))
    assert header.split(" | ")[1:] == ["clean", "apgd-ce", "apgd-dlr", "fab-t", "square", "robust |"]
    assert "| 8 |" in md and "| AUC |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert markdown_table(data) == md  # a dict read back from JSON renders the same table


def test_reproducible_with_fixed_seed(cases):
    a = run_autoattack(Bands(), cases[:2], [24 / 255], valid_range=RANGE, seed=5, **FAST).to_dict()
    b = run_autoattack(Bands(), cases[:2], [24 / 255], valid_range=RANGE, seed=5, **FAST).to_dict()
    assert a == b


def test_progress_cancel_and_mode_restored(cases):
    calls = []
    model = Bands().train()
    res = run_autoattack(model, cases[:1], [8 / 255], valid_range=RANGE, progress=lambda f, m: calls.append(f),
                         keep_examples=True, **FAST)
    assert model.training and calls[-1] == 1.0 and calls == sorted(calls)
    assert res.examples is not None and res.examples[0][0].shape == (1, 1, 10, 10, 10)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        run_autoattack(model, cases[:1], [8 / 255], valid_range=RANGE, cancel=token, **FAST)
    assert model.training


def test_argument_checks(cases):
    with pytest.raises(ValueError, match="valid_range"):
        run_autoattack(Bands(), cases, [8 / 255])
    with pytest.raises(ValueError, match="unknown attack"):
        run_autoattack(Bands(), cases, [8 / 255], valid_range=RANGE, attacks=["cw"])
    with pytest.raises(ValueError, match="a case must be"):
        run_autoattack(Bands(), [(cases[0][0][0], cases[0][1])], [8 / 255], valid_range=RANGE)


def test_normalised_auc():
    assert normalised_auc([5, 10, 15], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert normalised_auc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert normalised_auc([5 / 255, 16 / 255], [0.8, 0.2]) == pytest.approx(0.5)
    assert normalised_auc([8 / 255], [0.3]) == 0.3
