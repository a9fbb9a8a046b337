"""Gradient-masking indicators: a deliberately masked toy defense trips them while PGD alone
calls it robust; an honest model with the same weights trips none; each rule on its own."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from defenses.evaluation import masking
from defenses.core.base import Defense, Prediction, ThreatModel
from defenses.evaluation.benchmark import EvalResult, EvalSpec, benchmark, evaluate

EPS = 0.3
N = 100


class Quantize(nn.Module):
    """round(x·(L−1))/(L−1): the output is piecewise constant, so its gradient is zero."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Wrapped(Defense):
    """A defense whose prediction is ``net`` (the toy; not registered: it lives in tests)."""

    name = "toy"

    def __init__(self, model: nn.Module, net: nn.Module, noise: float = 0.0):
        super().__init__(model, None, ThreatModel(eps=EPS))
        self.net, self.noise = net, noise

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        return {}

    def predictor(self):
        return self.net

    def predict(self, x):
        if self.noise:  # a randomized defense: fresh noise at every call
            x = (x + self.noise * torch.randn_like(x)).clamp(0, 1)
        return Prediction(self.net(x))


@pytest.fixture(scope="module")
def data(mnist):
    return mnist.test_x[:N], mnist.test_y[:N]


def spec(curve: list[float] | None = None) -> EvalSpec:
    return EvalSpec.for_dataset("mnist5k", EPS, [] if curve is None else curve, masking_samples=64)


def test_quantized_toy_trips_flags_while_pgd_alone_reports_it_robust(linear, data):
    toy = Wrapped(linear, nn.Sequential(Quantize(16), linear))
    x, y = data
    pgd_only = benchmark(toy, x, y, EPS, ["pgd-20"], adaptive=False)
    honest = benchmark(Wrapped(linear, linear), x, y, EPS, ["pgd-20"], adaptive=False)
    # PGD alone: the quantized model looks robust, the same weights without it are not
    assert pgd_only.robust_acc > 0.5 and honest.robust_acc < 0.05
    report = evaluate(toy, data, spec())
    raised = {k for k, v in report.flags.items() if v}
    assert len(raised) >= 2, report.evidence
    assert {"zero_gradients", "blackbox_beats_whitebox", "transfer_beats_whitebox",
            "large_eps_robust"} <= raised
    assert report.evidence["masking.zero_grad_frac"] == 1.0
    assert set(report.flags) == set(masking.FLAGS)


def test_honest_model_raises_no_flag(linear, data):
    report = evaluate(Wrapped(linear, linear), data, spec([0.1, 0.2]))
    assert not any(report.flags.values()), report.evidence
    assert report.evidence["masking.acc_large_eps"] <= 0.1
    assert math.isnan(report.evidence["masking.transfer_extra"])  # no surrogate: not applicable


def test_randomized_prediction_is_unstable(linear, data):
    noisy = Wrapped(linear, linear, noise=0.3)
    report = evaluate(noisy, (data[0][:40], data[1][:40]),
                      EvalSpec.for_dataset("mnist5k", EPS, [], masking_samples=40, attacks=("fgsm",)))
    assert report.flags["unstable_predictions"]
    assert report.evidence["masking.unstable_frac"] > 0.02


def fake(eps: float, robust: list[bool], acc: dict[str, float] | None = None,
         broken: dict[str, int] | None = None) -> EvalResult:
    mask = torch.tensor(robust)
    r = float(mask.float().mean())
    return EvalResult(clean_acc=1.0, robust_acc=r, robust_attack="+".join(acc or {}),
                      acc=acc or {"pgd-20": r}, broken_by=broken or {"pgd-20": 0},
                      clean_rejected=0.0, n=len(robust), seconds=0.0, eps=eps, robust_mask=mask)


@pytest.mark.parametrize("counts,flag", [((50, 40, 20), False), ((50, 40, 45), True),
                                         ((50, 40, 42), False)])
def test_robust_accuracy_rising_with_eps_is_flagged(counts, flag):
    n = 100
    results = {e: fake(e, [i < c for i in range(n)]) for e, c in zip((0.1, 0.2, 0.3), counts)}
    raised, rise = masking._eps_rise(results, masking.MaskingConfig())
    assert raised is flag
    assert rise == pytest.approx(max(0, max(counts[j] - counts[i] for i in range(3)
                                            for j in range(i + 1, 3))) / n)


def test_cascade_counts_blackbox_and_transfer_only_after_a_whitebox_attack():
    after = fake(0.3, [True] * 10 + [False] * 90,
                 acc={"pgd-20": 0.2, "square-1000": 0.1, "transfer-pgd-20": 0.1},
                 broken={"pgd-20": 80, "square-1000": 10, "transfer-pgd-20": 0})
    before = fake(0.3, [True] * 10 + [False] * 90, acc={"square-1000": 0.2, "pgd-20": 0.1},
                  broken={"square-1000": 80, "pgd-20": 10})
    assert masking._cascade_extra({0.3: after}, "blackbox") == (10, 0.1)
    assert masking._cascade_extra({0.3: after}, "transfer") == (0, 0.0)
    assert masking._cascade_extra({0.3: before}, "blackbox") == (0, 0.0)


def test_an_effect_needs_enough_points_and_enough_accuracy():
    cfg = masking.MaskingConfig(tol=0.02, min_points=3)
    assert masking._significant(3, 0.02, cfg)
    assert not masking._significant(2, 0.5, cfg)
    assert not masking._significant(30, 0.01, cfg)


def test_attack_kinds_and_surrogate(linear):
    assert [masking.attack_kind(n) for n in ("square-5000", "transfer-pgd-20", "bpda-pgd-20",
                                             "apgd_t-100")] == ["blackbox", "transfer", "whitebox",
                                                                "whitebox"]
    wrapped = Wrapped(linear, nn.Sequential(Quantize(4), linear))
    assert wrapped.surrogate() is linear
    assert Wrapped(linear, linear).surrogate() is None


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="samples"):
        masking.MaskingConfig(samples=0)
    with pytest.raises(ValueError, match="increasing"):
        masking.MaskingConfig(steps=(20, 5))


# ---------------------------------------------------------------- every attack counts

class Masked(Defense):
    """The quantized linear model as the defense's own model: no surrogate to transfer from,
    no gradient to follow; only a gradient-free attack finds what it lacks."""

    name = "masked_toy"

    def __init__(self, net: nn.Module):
        super().__init__(net, None, ThreatModel(eps=EPS))

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        return {}

    def predict(self, x):
        return Prediction(self.model(x))


def test_a_point_square_breaks_in_the_masking_checks_is_not_robust(linear, mnist):
    toy = Masked(nn.Sequential(Quantize(16), linear))
    x, y = mnist.test_x[:100], mnist.test_y[:100]
    torch.manual_seed(0)
    cascade_only = benchmark(toy, x, y, EPS, ["pgd-20"], adaptive=False)
    report = evaluate(toy, (x, y), EvalSpec.for_dataset("mnist5k", EPS, [], masking_samples=64,
                                                        attacks=("pgd-20",), adaptive=False))
    r = report.primary
    assert report.flags["blackbox_beats_whitebox"]
    assert r.broken_by["check.square-100"] > 10
    # the number is the per-example worst case over everything run, Square included
    assert r.robust_acc <= cascade_only.robust_acc - r.broken_by["check.square-100"] / len(y) + 1e-9
    assert r.robust_acc == pytest.approx(r.robust_mask.float().mean().item())
    assert r.robust_attack.endswith("+checks") and list(r.acc)[0] == "pgd-20"
