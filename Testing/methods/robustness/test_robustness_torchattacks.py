"""Cross-check of our APGD-CE, APGD-DLR and Square against torchattacks (an independent implementation).

A small MLP is trained for about a second on a synthetic 4-class dataset of noisy 16x16 prototypes
(inputs in [0, 1], so torchattacks' own [0, 1] clamping matches our valid range) and wrapped as a
segmentation model with one voxel (logits (B, K) -> (B, K, 1, 1), labels (B, 1, 1)); its foreground
Dice per case is then the accuracy.  Same eps (8/255), iterations (20), restarts (1) and queries (500);
our robust accuracy must be within 5 percentage points of torchattacks' on 200 test samples.

Note on Square: torchattacks (like the AutoAttack and Square reference code) draws a square's
corner as ``int(rand * (size - side))``, so it never places a square at the last row or column;
we draw from all ``size - side + 1`` positions.  That makes the reference measurably weaker
(here about 3 points at 500 queries, up to 8 at 1000 queries with 1-pixel squares).  So Square is
compared two-sided (within 5 points) with torchattacks whose corner draw is extended to the last
position, and one-sided with the unmodified torchattacks (ours may be stronger, not weaker).

torchattacks 3.5.1 declares torchvision and requests~=2.25 as dependencies but imports neither;
install it beside torch with ``pip install --no-deps torchattacks==3.5.1``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepimaging.robustness import ClassifierAsSegmenter, apgd_attack, square_attack

try:
    import torchattacks
except Exception as exc:  # not installed, or failing to import beside this torch
    pytest.skip(f"torchattacks cannot be imported ({type(exc).__name__}: {exc}); install it with "
                "'pip install --no-deps torchattacks==3.5.1' to run the cross-check against an independent "
                "implementation", allow_module_level=True)

K, SIDE, EPS, STEPS, QUERIES, TOL = 4, 16, 8 / 255, 20, 500, 0.05


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(0)
    prototypes = 0.5 + 0.1 * (torch.rand(K, 1, SIDE, SIDE, generator=gen) * 2 - 1)

    def sample(n):
        y = torch.randint(0, K, (n,), generator=gen)
        return (prototypes[y] + 0.3 * torch.randn(n, 1, SIDE, SIDE, generator=gen)).clamp(0, 1), y

    x_train, y_train = sample(600)
    x_test, y_test = sample(200)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.Tanh(), nn.Linear(32, K))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(clf(x_train), y_train).backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        clean_acc = float((clf(x_test).argmax(1) == y_test).float().mean())
    return clf, x_test, y_test, clean_acc


def _theirs(attack, clf, x, y) -> float:
    adv = attack(x, y).detach()
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    with torch.no_grad():
        return float((clf(adv).argmax(1) == y).float().mean())


def _ours(result) -> float:
    return float((result.dice == 1.0).float().mean())


CASES = {
    "apgd-ce": (lambda seg, x, y: apgd_attack(seg, x, y, EPS, loss="ce", steps=STEPS, restarts=1,
                                              valid_range=(0.0, 1.0)),
                lambda clf: torchattacks.APGD(clf, eps=EPS, steps=STEPS, n_restarts=1, loss="ce", seed=0)),
    "apgd-dlr": (lambda seg, x, y: apgd_attack(seg, x, y, EPS, loss="dlr", steps=STEPS, restarts=1,
                                               valid_range=(0.0, 1.0)),
                 lambda clf: torchattacks.APGD(clf, eps=EPS, steps=STEPS, n_restarts=1, loss="dlr", seed=0)),
    "square": (lambda seg, x, y: square_attack(seg, x, y, EPS, n_queries=QUERIES, restarts=1, valid_range=(0.0, 1.0)),
               lambda clf: torchattacks.Square(clf, eps=EPS, n_queries=QUERIES, n_restarts=1, seed=0)),
}


def _all_positions(self, low=0, high=1, shape=(1,)):
    """torchattacks.Square.random_int with the last position included (``high`` inclusive)."""
    return (low + (high - low + 1) * torch.rand(list(shape)).to(self.device)).long()


@pytest.mark.parametrize("name", list(CASES))
def test_robust_accuracy_matches_torchattacks(setup, name, monkeypatch):
    clf, x, y, clean_acc = setup
    ours_fn, theirs_factory = CASES[name]
    result = ours_fn(ClassifierAsSegmenter(clf), x, y.view(-1, 1, 1))
    assert float((result.x_adv - x).abs().max()) <= EPS + 1e-6
    ours, theirs = _ours(result), _theirs(theirs_factory(clf), clf, x, y)
    assert 0.0 < ours < clean_acc and 0.0 < theirs < clean_acc  # a non-trivial operating point
    if name == "square":
        assert ours <= theirs + TOL, f"square: ours {ours:.3f} weaker than torchattacks {theirs:.3f}"
        monkeypatch.setattr(torchattacks.Square, "random_int", _all_positions)
        unmodified, theirs = theirs, _theirs(theirs_factory(clf), clf, x, y)
        print(f"square: torchattacks unmodified {unmodified:.3f}")
    print(f"{name}: clean {clean_acc:.3f} ours {ours:.3f} torchattacks {theirs:.3f}")
    assert abs(ours - theirs) <= TOL, f"{name}: ours {ours:.3f} vs torchattacks {theirs:.3f}"
