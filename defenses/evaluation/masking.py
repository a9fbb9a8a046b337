"""Gradient-masking indicators (Athalye et al. 2018; Carlini et al. 2019 "On evaluating
adversarial robustness"; Tramèr et al. 2020 "On adaptive attacks"), computed after every
evaluation and written as ``flag.<name>`` (with the numbers behind them as metrics
``masking.*``). A raised flag does not prove the robust accuracy wrong; it says the gradients an
attack followed did not behave like those of an honestly robust model, so the number is suspect.

Flags (``FLAGS``):

- ``blackbox_beats_whitebox``: Square (gradient-free) fools points every white-box attack
  failed on — in the cascade itself (a ``square-*`` attack after a white-box one) or in a
  Square run on the points still robust at the end of the primary-ε cascade.
- ``transfer_beats_whitebox``: the same for a transfer attack: in the cascade (``transfer-*``)
  or PGD crafted on a surrogate (the defense's ``surrogate()`` if it has one, else its bare
  ``model`` when ``predictor()`` wraps it) fooling still-robust points.
- ``nonmonotone_eps``: robust accuracy rises with ε along the robustness curve.
- ``nonmonotone_steps``: PGD with more steps leaves more points robust than with fewer.
- ``large_eps_robust``: PGD at a large ε (MNIST 0.5, CIFAR 64/255) leaves more than
  ``large_eps_acc`` of the points classified correctly: an unbounded attack failing means the
  attack, not the model, is stuck. Judged on the defended prediction without its rejection:
  at that ε an input can become another digit, so a detector rejecting it may be right; the
  question here is whether gradients move the defended classifier at all.
- ``zero_gradients``: more than ``zero_grad_frac`` of the points have an all-zero or non-finite
  input gradient of the margin loss (the margin, not cross-entropy, whose gradient underflows
  on confident predictions without any masking).
- ``unstable_predictions``: repeated ``predict`` calls on the same inputs disagree (label or
  rejection) on more than ``unstable_frac`` of them: a randomized defense, which PGD without
  EOT over-estimates.

Cost is bounded: every check runs on at most ``samples`` points (64 by default): PGD-5, PGD-20,
PGD-20 at the large ε, one gradient, ``repeats`` extra predictions, and on at most ``samples``
points still robust at the end of the cascade Square (``square_queries``, 100: enough for the
non-robust models a masked gradient hides; skipped when the cascade already ran Square) and a
surrogate PGD-20 — about 70 forward-backward passes plus 100 forwards of a 64-image batch,
whatever the evaluation size.

An effect counts when it moves at least ``min_points`` points and at least ``tol`` of the
evaluated accuracy (a subset's effect is scaled to the whole evaluation set), so one unlucky
point of a small subset raises nothing.

Every check attack that runs at the primary ε is also evidence: the points it breaks are
returned in ``MaskingReport.broken`` (Square, the transfer PGD, the PGD-5/PGD-20 of the steps
check, and the large-ε PGD's adversarials projected back onto the ε ball, a free extra start),
and ``defenses.evaluation.benchmark.evaluate`` lowers robust accuracy by them. A flag is a warning; a
broken point is a fact."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch

from defenses.attacks import PGD, Attack, frozen_eval
from defenses.core.base import predict_labels
from defenses.attacks.pgd import cw_margin_loss
from defenses.evaluation.results import EvalResult

if TYPE_CHECKING:
    from defenses.core.base import Defense

log = logging.getLogger(__name__)

FLAGS = ("blackbox_beats_whitebox", "transfer_beats_whitebox", "nonmonotone_eps",
         "nonmonotone_steps", "large_eps_robust", "zero_gradients", "unstable_predictions")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    samples: int = 64                 # points each check runs on (at most)
    large_eps: float | None = None    # None: min(1, 8 × primary ε)
    steps: tuple[int, int] = (5, 20)  # PGD steps compared by nonmonotone_steps
    square_queries: int = 100
    transfer_steps: int = 20
    repeats: int = 2                  # extra predict calls for unstable_predictions
    tol: float = 0.02                 # smallest effect, as a fraction of the evaluation set
    min_points: int = 3               # ... and in points
    large_eps_acc: float = 0.1
    zero_grad_frac: float = 0.1
    unstable_frac: float = 0.02

    def __post_init__(self):
        if self.samples <= 0:
            raise ValueError(f"MaskingConfig.samples={self.samples} must be positive")
        if len(self.steps) != 2 or not 0 < self.steps[0] < self.steps[1]:
            raise ValueError(f"MaskingConfig.steps={self.steps} must be two increasing step counts")


@dataclasses.dataclass
class MaskingReport:
    flags: dict[str, bool]
    evidence: dict[str, float]
    # check attack name -> indices (into the evaluated x) of points it fooled at the primary ε
    broken: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def attack_kind(name: str) -> str:
    """``blackbox`` (Square), ``transfer`` or ``whitebox`` (anything using the defense's gradient)."""
    if name.startswith("square"):
        return "blackbox"
    if name.startswith("transfer"):
        return "transfer"
    return "whitebox"


# ---------------------------------------------------------------- helpers

def _survivors(defense, attack: Attack, x, y, batch_size: int, judge_rejection: bool = True
               ) -> torch.Tensor:
    """Bool per point: still correct (or rejected, with ``judge_rejection``) after ``attack``."""
    out = []
    for i in range(0, len(x), batch_size):
        adv = attack(x[i:i + batch_size], y[i:i + batch_size])
        pred, rej = predict_labels(defense, adv, batch_size)
        ok = pred == y[i:i + batch_size]
        out.append(ok | rej if judge_rejection else ok)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)


def _significant(points: int, fraction_of_eval: float, cfg: MaskingConfig) -> bool:
    return points >= cfg.min_points and fraction_of_eval >= cfg.tol


def _cascade_extra(results: Mapping[float, EvalResult], kind: str) -> tuple[int, float]:
    """Most points an attack of ``kind`` broke after a white-box attack of the same cascade,
    over every ε: (points, fraction of that evaluation)."""
    best = (0, 0.0)
    for r in results.values():
        seen_white = False
        for name in r.acc:
            k = attack_kind(name)
            if k == "whitebox":
                seen_white = True
            elif k == kind and seen_white and r.n:
                count = r.broken_by.get(name, 0)
                if count / r.n > best[1]:
                    best = (count, count / r.n)
    return best


# ---------------------------------------------------------------- the checks

def check(defense: "Defense", x: torch.Tensor, y: torch.Tensor,
          results: Mapping[float, EvalResult], cfg: MaskingConfig = MaskingConfig(),
          batch_size: int = 256) -> MaskingReport:
    """All indicators for ``defense`` given its evaluation ``results`` (per ε, primary first,
    each computed on a prefix of (x, y) with ``robust_mask`` set)."""
    primary = next(iter(results.values()))
    eps = primary.eps
    flags: dict[str, bool] = {}
    ev: dict[str, float] = {}
    with frozen_eval(defense.model):
        pred, rej = predict_labels(defense, x[:cfg.samples], batch_size)
        correct = ((pred == y[:cfg.samples]) & ~rej).nonzero().squeeze(1)
        xc, yc = x[correct], y[correct]
        clean_frac = primary.clean_acc
        robust_idx = primary.robust_mask.nonzero().squeeze(1)[:cfg.samples].to(x.device)
        robust_scale = primary.robust_acc / max(len(robust_idx), 1)
        xr, yr = x[robust_idx], y[robust_idx]

        broken: dict[str, torch.Tensor] = {}
        for kind, flag, run in (("blackbox", "blackbox_beats_whitebox", _square_check),
                                ("transfer", "transfer_beats_whitebox", _transfer_check)):
            count, frac = _cascade_extra(results, kind)
            found = run(defense, xr, yr, eps, cfg, batch_size, tuple(primary.acc))
            extra = None if found is None else float(len(found[1]))
            if found is not None:
                broken[found[0]] = robust_idx[found[1]]
            ev[f"masking.{kind}_cascade_extra"] = frac
            ev[f"masking.{kind}_extra"] = math.nan if extra is None else extra * robust_scale
            sub_points = 0 if extra is None else round(extra)
            flags[flag] = _significant(count, frac, cfg) or (
                extra is not None and _significant(sub_points, extra * robust_scale, cfg))

        flags["nonmonotone_eps"], ev["masking.eps_rise"] = _eps_rise(results, cfg)
        flags["nonmonotone_steps"] = _steps_check(defense, xc, yc, eps, cfg, batch_size, clean_frac,
                                                  ev, correct, broken)
        flags["large_eps_robust"] = _large_eps_check(defense, xc, yc, eps, cfg, batch_size, ev,
                                                     correct, broken)
        flags["zero_gradients"] = _gradient_check(defense, xc, yc, cfg, ev)
        flags["unstable_predictions"] = _stability_check(defense, x[:cfg.samples], pred, rej,
                                                         cfg, batch_size, ev)
    raised = [k for k, v in flags.items() if v]
    if raised:
        log.warning("%s: gradient-masking indicators raised: %s", getattr(defense, "name", "?"),
                    ", ".join(raised))
    return MaskingReport(flags, ev, broken)


Found = Optional[tuple[str, torch.Tensor]]  # (check attack name, positions it fooled); None: not run


def _fooled(defense, attack: Attack, x, y, batch_size: int) -> torch.Tensor:
    """Positions in (x, y) that ``attack`` fools (accepted and wrong)."""
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.long, device=y.device)
    return (~_survivors(defense, attack, x, y, batch_size)).nonzero().squeeze(1)


def _square_check(defense, xr, yr, eps, cfg, batch_size, cascade_names=()) -> Found:
    """Square on the still-robust subset; None when the cascade already ran Square (its points
    are counted there)."""
    if any(attack_kind(n) == "blackbox" for n in cascade_names):
        return None
    square = defense.blackbox_attack(eps, cfg.square_queries)
    return f"square-{cfg.square_queries}", _fooled(defense, square, xr, yr, batch_size)


def _transfer_check(defense, xr, yr, eps, cfg, batch_size, cascade_names=()) -> Found:
    surrogate = defense.surrogate()
    if surrogate is None:
        return None
    attack = PGD(surrogate, eps, steps=cfg.transfer_steps)
    return f"transfer-pgd-{cfg.transfer_steps}", _fooled(defense, attack, xr, yr, batch_size)


def _eps_rise(results: Mapping[float, EvalResult], cfg: MaskingConfig) -> tuple[bool, float]:
    """Largest rise of robust accuracy from a smaller to a larger ε, on the points every ε
    was evaluated on."""
    ordered = sorted(results.values(), key=lambda r: r.eps)
    n = min(r.n for r in ordered)
    counts = [int(r.robust_mask[:n].sum()) for r in ordered]
    rise = max([counts[j] - counts[i] for i in range(len(counts)) for j in range(i + 1, len(counts))]
               + [0])
    return _significant(rise, rise / max(n, 1), cfg), rise / max(n, 1)


def _steps_check(defense, xc, yc, eps, cfg, batch_size, clean_frac, ev, where, broken) -> bool:
    few, many = cfg.steps
    acc = {}
    for k in (few, many):
        surv = _survivors(defense, PGD(defense.predictor(), eps, steps=k), xc, yc, batch_size)
        acc[k] = int(surv.sum())
        ev[f"masking.acc_pgd{k}"] = acc[k] / max(len(yc), 1)
        broken[f"pgd-{k}"] = where[~surv]
    rise = acc[many] - acc[few]
    return _significant(rise, rise / max(len(yc), 1) * clean_frac, cfg)


def _large_eps_check(defense, xc, yc, eps, cfg, batch_size, ev, where, broken) -> bool:
    """PGD at the large ε; its adversarials, projected back onto the ε ball, are judged at ε too."""
    big = cfg.large_eps if cfg.large_eps is not None else min(1.0, 8 * eps)
    attack = PGD(defense.predictor(), big, steps=cfg.steps[1])
    correct_big, fooled_at_eps = [], []
    for i in range(0, len(yc), batch_size):
        x, y = xc[i:i + batch_size], yc[i:i + batch_size]
        adv = attack(x, y)
        correct_big.append(predict_labels(defense, adv, batch_size)[0] == y)
        near = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
        pred, rej = predict_labels(defense, near, batch_size)
        fooled_at_eps.append((pred != y) & ~rej)
    acc = float(torch.cat(correct_big).float().mean()) if correct_big else 0.0
    if fooled_at_eps:
        broken[f"large_eps-pgd-{cfg.steps[1]}"] = where[torch.cat(fooled_at_eps)]
    ev["masking.large_eps"], ev["masking.acc_large_eps"] = big, acc
    return acc > cfg.large_eps_acc


def _gradient_check(defense, xc, yc, cfg, ev) -> bool:
    if len(yc) == 0:
        ev["masking.zero_grad_frac"] = 0.0
        return False
    model: Callable = defense.predictor()
    with torch.enable_grad():
        xg = xc.detach().clone().requires_grad_(True)
        grad, = torch.autograd.grad(cw_margin_loss(model(xg), yc), xg, allow_unused=True)
    if grad is None:  # the prediction does not depend on the input at all
        frac = 1.0
    else:
        flat = grad.flatten(1)
        bad = (flat == 0).all(1) | ~torch.isfinite(flat).all(1)
        frac = float(bad.float().mean())
    ev["masking.zero_grad_frac"] = frac
    return frac > cfg.zero_grad_frac


def _stability_check(defense, x, pred, rej, cfg, batch_size, ev) -> bool:
    changed = torch.zeros_like(pred, dtype=torch.bool)
    for _ in range(cfg.repeats):
        p, r = predict_labels(defense, x, batch_size)
        changed |= (p != pred) | (r != rej)
    frac = float(changed.float().mean()) if len(pred) else 0.0
    ev["masking.unstable_frac"] = frac
    return bool(changed.any()) and frac > cfg.unstable_frac


__all__ = ["FLAGS", "MaskingConfig", "MaskingReport", "check", "attack_kind"]
