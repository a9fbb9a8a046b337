"""Evaluation you can trust: clean and worst-case robust accuracy of a defense (RobustBench
style), attack presets, robustness curves over ε and gradient-masking indicators.

Two entry points, one library:

- ``benchmark(defense, x, y, eps, attacks, batch_size=256, adaptive=True) -> EvalResult``: one
  ε. ``attacks`` mixes attack names (``defenses.attacks`` plus AutoAttack's components below),
  preset names and built ``Attack`` objects. With ``adaptive`` the defense's own
  ``adaptive_attacks(eps)`` are appended.
- ``evaluate(defense, (x, y), spec) -> Report``: RobustBench's ``benchmark(model, data,
  threat_model)`` for a defense. The model is the defense's own (a defense owns its model, and attacks must
  see ``defense.predictor()``, not a bare network), so it is not a separate argument; ``spec``
  (``EvalSpec``) is the threat model as the evaluation sees it: the ε list (primary first),
  attacks/presets, norm and the gradient-masking checks. It runs ``benchmark`` once per ε
  and then ``defenses.evaluation.masking.check``. The sweep's trials, the sweep's final re-evaluation
  and ``python -m orchestrator.evaluate`` all call it.

Cascade (AutoAttack style): each attack only sees the points every earlier attack failed to
break, so an example counts as robust only if it survives every attack of the list, and strong
attacks late in the list cost little. ``acc[attack]`` is the robust accuracy after that
attack and all before it. For detectors, a rejected clean input is an error and a rejected
adversarial input is defended.

Presets (``PRESETS``):

- ``fast``: FGSM, APGD-CE-20, APGD-T-20×3: the cascade a sweep evaluates every trial with.
  Fixed-step PGD overstates short trials by 20–35 points; this list is within 3–8 of
  AutoAttack on them (docs/evaluation.md).
- ``standard``: AutoAttack "standard" (Croce & Hein 2020): APGD-CE (100 steps), APGD-T (100
  steps, 9 target classes), FAB-T (100 steps, 9 targets), Square (5000 queries), one restart
  each. APGD is ours (``defenses.attacks.apgd``: the authors' algorithm with early stopping,
  as strong as theirs at a fraction of the cost on broken points); FAB-T and Square are
  torchattacks'. torchattacks' own ``AutoAttack`` (the ``autoattack``
  attack) runs 10 steps per component; this preset runs the paper's 100. Reduced budgets are
  spelled out by name: ``apgd_t-50x3`` is APGD-T with 50 steps and 3 target classes.
- ``reduced``: the same four attacks at budgets a CPU affords on a sweep's whole front:
  APGD-CE-50, APGD-T-50×3, FAB-T-50×3, Square-1000 (the default preset's final evaluation;
  how far it stands from ``standard`` is measured in docs/evaluation.md).
- ``adaptive``: the defense's ``adaptive_attacks(eps)`` (BPDA and full differentiation through
  saliency steps, EOT, detector-aware attacks, transfer from a base model). A defense without
  any is a plain differentiable classifier, whose adaptive attack is strong white-box PGD on
  it: ``pgd-40`` + ``pgd_cw-40``.
- ``paper``: the defense's own published attack settings, ``Defense.paper_attacks(eps) ->
  list[str | Attack] | None``. A defense whose method returns None (the base class's) defines
  no paper setting: ``paper`` is then an ``EvalConfigError`` naming the presets it can use
  (``check_paper`` says so from the class alone, before anything is built).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from fractions import Fraction
from typing import Any, Callable, Sequence, Union

import torch

from defenses import attacks as attack_lib
from defenses.evaluation import masking as masking_lib
from defenses.attacks import Attack, check_images, frozen_eval
from defenses.core.base import Defense, cudnn_mode, predict_labels
from defenses.core.data import shard_bounds
from defenses.evaluation.results import EvalResult, merge_results

log = logging.getLogger(__name__)

AttackSpec = Union[str, Attack]

FAST, STANDARD, REDUCED = (attack_lib.PRESET_ATTACKS[p] for p in ("fast", "standard", "reduced"))
ADAPTIVE_FALLBACK = ("pgd-40", "pgd_cw-40")
SQUARE_QUERIES = 1000  # a bare "square": torchattacks' budget as the library builds it
PRESETS = ("fast", "standard", "reduced", "adaptive", "paper")
PAPER_HOOK = "paper_attacks"

NORMS = ("Linf", "L2")  # threat models a user may name
# Every attack of the library runs in L∞: ``Attack.__call__`` projects onto the L∞ ball, so
# even the L2 attacks (C&W, DeepFool) only count within an L∞ ε. No attack supports L2.
SUPPORTED_NORMS = ("Linf",)

# Robustness-curve ε (the field's standard radius, MNIST 0.3 and CIFAR 8/255, and two smaller)
# and the "large ε" of the unbounded-attack check.
DEFAULT_EVAL_EPS = {"mnist5k": (0.1, 0.2, 0.3),
                    "cifar10": (2 / 255, 4 / 255, 8 / 255),
                    "cifar100": (2 / 255, 4 / 255, 8 / 255)}
LARGE_EPS = {"mnist5k": 0.5, "cifar10": 64 / 255, "cifar100": 64 / 255}


class EvalConfigError(ValueError):
    """An attack, preset, ε or threat model the evaluation cannot run; one line saying why."""


# ---------------------------------------------------------------- names, presets, ε

def _valid_list() -> str:
    return (f"valid attacks: {', '.join(attack_lib.names())} (optionally with a budget, e.g. "
            f"pgd-40, apgd_t-50x3); valid presets: {', '.join(PRESETS)}")


def parse_attack(name: str) -> tuple[str, int | None, int | None]:
    """``attack_lib.parse`` as an EvalConfigError whose message lists the presets too
    (presets are not attacks: see ``check_attacks``)."""
    try:
        return attack_lib.parse(name)
    except attack_lib.AttackNameError as e:
        if str(e).startswith("unknown attack"):
            raise EvalConfigError(f"unknown attack or preset {name!r}; {_valid_list()}") from None
        raise EvalConfigError(str(e)) from None


def check_attacks(names: Sequence[AttackSpec], norm: str = "Linf") -> None:
    """EvalConfigError for the first unknown attack/preset or an unsupported threat model."""
    if norm not in NORMS:
        raise EvalConfigError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if not names:
        raise EvalConfigError(f"no attacks given; {_valid_list()}")
    for name in names:
        if isinstance(name, Attack):
            continue
        what = f"preset {name!r}" if name in PRESETS else f"attack {parse_attack(name)[0]!r}"
        if norm not in SUPPORTED_NORMS:
            raise EvalConfigError(f"{what} does not support the {norm} threat model; "
                                  f"it supports: {', '.join(SUPPORTED_NORMS)}")


def check_eps(eps: float, what: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) \
            or not 0.0 <= eps <= 1.0:
        raise EvalConfigError(f"{what}={eps!r} outside [0,1]: ε is in input units, e.g. 8/255 or 0.3")
    return float(eps)


def eps_label(eps: float) -> str:
    """Column-name spelling of ε: ``0.3``, ``0.5`` for round decimals, ``8/255`` for CIFAR's
    pixel steps, else 4 significant digits."""
    if abs(eps - round(eps, 3)) < 1e-9:
        return f"{round(eps, 3):g}"
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def parse_eps(text: str) -> float:
    """Inverse of ``eps_label`` (and any float or a/b fraction): ``"8/255"`` -> 0.0313…"""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise EvalConfigError(f"eps {text!r} is not a number (write 0.3 or 8/255)") from None
    return check_eps(value)


def default_eval_eps(dataset: str, primary: float) -> tuple[float, ...]:
    """The robustness-curve ε of ``dataset``, primary first (it is added when missing)."""
    rest = [e for e in DEFAULT_EVAL_EPS.get(dataset, ()) if not math.isclose(e, primary)]
    return (primary, *sorted(rest))


def large_eps(dataset: str, eps: Sequence[float]) -> float:
    """ε at which an unbounded attack must win (MNIST 0.5, CIFAR 64/255; else 8·max ε)."""
    return LARGE_EPS.get(dataset, min(1.0, 8 * max(eps)))


# ---------------------------------------------------------------- building attacks

def make_attack(name: str, model: Callable, eps: float) -> Attack:
    parse_attack(name)  # an unknown name as an EvalConfigError
    return attack_lib.make(name, model, eps)


def _no_paper_setting(name: str) -> EvalConfigError:
    usable = ", ".join(p for p in PRESETS if p != "paper")
    return EvalConfigError(f"preset 'paper': defense {name!r} defines no paper setting "
                           f"({PAPER_HOOK}); use the presets {usable} or attack names")


def check_paper(defense_cls: type, names: Sequence[AttackSpec]) -> None:
    """EvalConfigError when ``names`` ask for the ``paper`` preset and ``defense_cls`` defines
    no paper setting (it does not override ``Defense.paper_attacks``). Decided from the class,
    so a sweep spec fails before Ray starts and before any defense is built."""
    if not any(isinstance(n, str) and n == "paper" for n in names):
        return
    if defense_cls.paper_attacks is Defense.paper_attacks:
        raise _no_paper_setting(getattr(defense_cls, "name", defense_cls.__name__))


def paper_attacks(defense: Defense, eps: float) -> list[AttackSpec] | None:
    """``defense.paper_attacks(eps)`` as a list, or None when it defines no paper setting."""
    specs = defense.paper_attacks(eps)
    if specs is None:
        return None
    specs = list(specs)
    if any(s == "paper" for s in specs if isinstance(s, str)):
        raise EvalConfigError(f"{defense.name}.{PAPER_HOOK} may not name the 'paper' preset itself")
    return specs


def _preset(name: str, defense: Defense, eps: float) -> list[AttackSpec]:
    if name == "fast":
        return list(FAST)
    if name == "standard":
        return list(STANDARD)
    if name == "reduced":
        return list(REDUCED)
    if name == "adaptive":
        own = defense.adaptive_attacks(eps)
        return own if own else list(ADAPTIVE_FALLBACK)
    specs = paper_attacks(defense, eps)
    if specs is None:
        # no silent substitute: numbers labelled "paper" must come from the paper's attacks
        raise _no_paper_setting(getattr(defense, "name", type(defense).__name__))
    return specs


def build_attacks(specs: Sequence[AttackSpec], defense: Defense, eps: float,
                  adaptive: bool = True) -> list[Attack]:
    """The cascade at ``eps``: presets expanded, names built against ``defense.predictor()``,
    then (``adaptive``) the defense's own adaptive attacks; one attack per name, first kept.
    Square (``square-N``) is the defense's ``blackbox_attack``: on a detector it attacks the
    whole decision ("misclassified and accepted"), as the deployed pipeline is judged; on
    its bare logits it would stop at adversarials the detector rejects."""
    predictor = defense.predictor()
    out: list[Attack] = []

    def add(spec: AttackSpec, depth: int = 0) -> None:
        if isinstance(spec, Attack):
            if not math.isclose(spec.eps, eps):
                raise EvalConfigError(f"attack {spec.name!r} was built for ε={spec.eps:g}, not {eps:g}")
            out.append(spec)
        elif spec in PRESETS:
            if depth > 0 and spec == "paper":
                raise EvalConfigError(f"{PAPER_HOOK} may not name the 'paper' preset itself")
            for s in _preset(spec, defense, eps):
                add(s, depth + 1)
        elif parse_attack(spec)[0] == "square":
            out.append(defense.blackbox_attack(eps, parse_attack(spec)[1] or SQUARE_QUERIES))
        else:
            out.append(make_attack(spec, predictor, eps))

    for spec in specs:
        add(spec)
    if adaptive:
        out += defense.adaptive_attacks(eps)
    unique: dict[str, Attack] = {}
    for attack in out:
        unique.setdefault(attack.name, attack)
    return list(unique.values())


# ---------------------------------------------------------------- one ε

def benchmark(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float,
              attacks: Sequence[AttackSpec], batch_size: int = 256, adaptive: bool = True,
              *, norm: str = "Linf", known: torch.Tensor | None = None) -> EvalResult:
    """Evaluate ``defense`` on (x, y) against ``attacks`` (names, presets or ``Attack``s) at
    L∞ radius ``eps``, then (``adaptive``) against the defense's own adaptive attacks.
    ``known``: bool per input (the first ``len(known)`` of x) that an earlier evaluation of
    this same model at this ε already broke: they are not attacked again and count as broken
    (``broken_by[EARLIER]``), as a cascade does with the points earlier attacks broke.
    The model is in eval mode throughout and its mode restored after."""
    check_images(x, "evaluation images")
    check_eps(eps)
    check_attacks(list(attacks), norm)
    start = time.perf_counter()
    built = build_attacks(attacks, defense, eps, adaptive)  # fail on bad names first
    with frozen_eval(defense.model):
        pred, rejected = predict_labels(defense, x, batch_size)
        robust = (pred == y) & ~rejected
        clean_acc = robust.float().mean().item()
        acc: dict[str, float] = {}
        broken_by: dict[str, int] = {}
        names = [a.name for a in built]
        if known is not None:
            earlier = torch.zeros_like(robust)
            k = min(len(known), len(robust))
            earlier[:k] = known[:k].to(robust.device) & robust[:k]
            robust &= ~earlier
            broken_by[EARLIER], acc[EARLIER] = int(earlier.sum()), robust.float().mean().item()
            names.append(EARLIER)
        for attack in built:
            broken_by[attack.name] = _run_attack(defense, attack, x, y, robust, batch_size)
            acc[attack.name] = robust.float().mean().item()
            log.debug("after %s at ε=%g: robust %.4f", attack.name, eps, acc[attack.name])
    return EvalResult(
        clean_acc=clean_acc, robust_acc=robust.float().mean().item(),
        robust_attack="+".join(names), acc=acc, broken_by=broken_by,
        clean_rejected=rejected.float().mean().item(), n=len(y),
        seconds=time.perf_counter() - start, eps=float(eps), robust_mask=robust.cpu())


def _run_attack(defense: Defense, attack: Attack, x: torch.Tensor, y: torch.Tensor,
                robust: torch.Tensor, batch_size: int) -> int:
    """Attack the still-robust points; mark the fooled ones in ``robust``; count them."""
    idx = robust.nonzero().squeeze(1)
    broken = 0
    for i in range(0, len(idx), batch_size):
        j = idx[i:i + batch_size]
        adv = attack(x[j], y[j])
        adv_pred, adv_rej = predict_labels(defense, adv, batch_size)
        fooled = (adv_pred != y[j]) & ~adv_rej
        robust[j[fooled]] = False
        broken += int(fooled.sum())
    return broken


# ---------------------------------------------------------------- several ε + masking checks

@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The threat model of an evaluation. ``eps[0]`` is the primary ε (the ``robust_acc`` of a
    trial); the others give the robustness curve. ``curve_samples`` evaluates the other ε on
    the first N points only (None: all). ``masking=None`` skips the gradient-masking checks."""

    eps: tuple[float, ...]
    attacks: tuple[AttackSpec, ...] = ("fast",)
    norm: str = "Linf"
    adaptive: bool = True
    curve_samples: int | None = None
    masking: masking_lib.MaskingConfig | None = masking_lib.MaskingConfig()
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        if not self.eps:
            raise EvalConfigError("eps: give at least one ε")
        for e in self.eps:
            check_eps(e)
        check_attacks(list(self.attacks), self.norm)
        if self.curve_samples is not None and self.curve_samples <= 0:
            raise EvalConfigError(f"curve_samples={self.curve_samples} must be positive (or None: all)")

    @classmethod
    def for_dataset(cls, dataset: str, eps: float, eval_eps: Sequence[float] | None = None,
                    masking_samples: int = masking_lib.MaskingConfig.samples,
                    **kwargs: Any) -> "EvalSpec":
        """Primary ``eps`` plus ``eval_eps`` (default: the dataset's curve), with the masking
        checks' large ε set for the dataset; ``masking_samples=0`` turns the checks off."""
        check_eps(eps)
        if eval_eps is None:
            all_eps = default_eval_eps(dataset, eps)
        else:
            all_eps = (eps, *sorted(e for e in map(check_eps, eval_eps) if not math.isclose(e, eps)))
        masking = None
        if masking_samples:
            masking = masking_lib.MaskingConfig(samples=masking_samples,
                                                large_eps=large_eps(dataset, all_eps))
        return cls(eps=tuple(all_eps), masking=masking, **kwargs)


@dataclasses.dataclass
class Report:
    results: dict[float, EvalResult]     # per ε, primary first
    flags: dict[str, bool]               # gradient-masking indicators (``flag.<name>``)
    evidence: dict[str, float]           # the numbers behind the flags
    seconds: float
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the defense's own

    @property
    def primary(self) -> EvalResult:
        return next(iter(self.results.values()))

    def broken(self) -> dict[float, torch.Tensor]:
        """Per ε, bool per evaluated input: not robust (wrong, rejected or broken by an attack);
        what a later evaluation of the same model passes as ``known``."""
        return {eps: ~r.robust_mask for eps, r in self.results.items() if r.robust_mask is not None}

    def curve_columns(self) -> dict[str, float]:
        """``robust_acc@<ε>``, ``n_eval@<ε>`` and ``acc.<attack>@<ε>`` for every ε (the primary
        one too)."""
        out: dict[str, float] = {}
        for eps, r in self.results.items():
            label = eps_label(eps)
            out[f"robust_acc@{label}"] = r.robust_acc
            out[f"n_eval@{label}"] = r.n
            out.update({f"acc.{a}@{label}": v for a, v in r.acc.items()})
        return out


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation split over the ``world`` ranks of a data-parallel
    trial: at each ε it attacks its contiguous share of the points (``shard_bounds``), and
    ``gather(obj)`` returns every rank's ``obj`` in rank order (``all_gather_object``). The
    attacks' random starts are seeded ``seed + rank``. Rank 0 then holds every point's outcome
    and runs the gradient-masking checks and the defense's metrics alone."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]


def evaluate(defense: Defense, data: tuple[torch.Tensor, torch.Tensor], spec: EvalSpec,
             known: dict[float, torch.Tensor] | None = None,
             fpr_images: torch.Tensor | None = None, shard: Shard = Shard()) -> Report | None:
    """Every ε of ``spec`` (same seed for each, so curves compare like with like), then the
    gradient-masking checks of ``defenses.evaluation.masking`` on their bounded subset. ``known``: per ε,
    the points an earlier evaluation of the same model broke (``Report.broken()`` of it; see
    ``benchmark``): the sweep's final evaluation starts from what the search already found.
    ``fpr_images``: clean test images a detector's realized FPR is measured on (default: the
    evaluated points); it costs one clean pass, so a trial passes its whole test split.
    ``shard``: this rank's part of a data-parallel evaluation; every rank must call it, and
    only rank 0 gets the ``Report`` (the others: None)."""
    with cudnn_mode(benchmark=False, deterministic=True):
        start = time.perf_counter()
        results = _cascades(defense, data, spec, known or {}, shard)
        if shard.rank != 0:
            return None
        return _checks(defense, data, spec, results, fpr_images, start)


def _cascades(defense: Defense, data: tuple[torch.Tensor, torch.Tensor], spec: EvalSpec,
              known: dict[float, torch.Tensor], shard: Shard) -> dict[float, EvalResult]:
    """``benchmark`` at every ε, on this shard's points; the shards' results merged."""
    x, y = data
    results: dict[float, EvalResult] = {}
    for i, eps in enumerate(spec.eps):
        n = len(y) if i == 0 or spec.curve_samples is None else min(spec.curve_samples, len(y))
        lo, hi = shard_bounds(n, shard.rank, shard.world)
        earlier = _at(known, eps)
        torch.manual_seed(spec.seed + shard.rank)  # the attacks' random starts
        part = None  # a rank with no points still joins the gather
        if hi > lo:
            part = benchmark(defense, x[lo:hi], y[lo:hi], eps, spec.attacks, spec.batch_size,
                             spec.adaptive, norm=spec.norm,
                             known=None if earlier is None else earlier[lo:hi])
        results[eps] = part if shard.world == 1 else merge_results(shard.gather(part))
        log.info("ε=%s: clean %.4f robust %.4f (%s)", eps_label(eps), results[eps].clean_acc,
                 results[eps].robust_acc, results[eps].robust_attack)
    return results


def _checks(defense: Defense, data: tuple[torch.Tensor, torch.Tensor], spec: EvalSpec,
            results: dict[float, EvalResult], fpr_images: torch.Tensor | None,
            start: float) -> Report:
    """The gradient-masking checks, monotonicity in ε and the defense's own metrics."""
    x, y = data
    flags: dict[str, bool] = {}
    evidence: dict[str, float] = {}
    if spec.masking is not None:
        torch.manual_seed(spec.seed)
        found = masking_lib.check(defense, x, y, results, spec.masking, spec.batch_size)
        flags, evidence = found.flags, found.evidence
        count_broken(results[spec.eps[0]], found.broken, CHECK_PREFIX, CHECKS)
    monotone_in_eps(results)
    # the defense's own metrics run every attack of the spec's cascade on every point (not on
    # survivors), so they are bounded like the curve, on its first points; the adaptive
    # attacks are left out: they already count in robust_acc, and on a detector they cost
    # 3-4x the cascade (feature squeezing: 85 of a trial's 365 s when they ran here)
    n = len(y) if spec.curve_samples is None else min(spec.curve_samples, len(y))
    with frozen_eval(defense.model):
        metrics = defense.evaluation_metrics(
            x[:n], y[:n], build_attacks(spec.attacks, defense, spec.eps[0], adaptive=False),
            spec.batch_size)
    if "fpr" in metrics:
        metrics.update(realized_fpr(defense, x if fpr_images is None else fpr_images,
                                    spec.batch_size))
    return Report(results, flags, evidence, time.perf_counter() - start, metrics)


def realized_fpr(defense: Defense, x: torch.Tensor, batch_size: int) -> dict[str, float]:
    """``fpr``: the share of clean images ``x`` the detector rejects, with ``n_fpr`` = len(x).
    At a 5 % target, 300 images leave a ±2.5-point 95 % interval, wider than the ±2 points a
    calibrated FPR is held to; a clean pass over a whole test split costs a second or two."""
    with frozen_eval(defense.model):
        _, rejected = predict_labels(defense, x, batch_size)
    return {"fpr": rejected.float().mean().item(), "n_fpr": len(x)}


def _at(by_eps: dict[float, torch.Tensor], eps: float) -> torch.Tensor | None:
    return next((v for e, v in by_eps.items() if math.isclose(e, eps)), None)


CHECK_PREFIX = "check."      # acc/broken_by keys of the gradient-masking checks' attacks
EARLIER = "earlier"          # acc/broken_by key (and robust_attack part): broken by an earlier
                             # evaluation of the same model (the sweep's search, for its final one)
CHECKS = "checks"            # their name in ``robust_attack``
SMALLER_EPS = "smaller_eps"  # acc/broken_by key (and robust_attack part): broken at a smaller ε


def count_broken(result: EvalResult, broken: dict[str, torch.Tensor], prefix: str = "",
                 label: str | None = None) -> None:
    """Points other attacks fooled at ``result``'s ε (indices into its inputs) are not robust:
    lower ``result`` by them, one ``acc``/``broken_by`` entry per attack, as if the cascade had
    run them last, and name them in ``robust_attack`` (as ``label``, else each by name).
    Whatever part of an evaluation ran an attack, its evidence counts."""
    if not broken:
        return
    mask = result.robust_mask
    for name, idx in broken.items():
        idx = idx.cpu()
        before = int(mask.sum())
        mask[idx[idx < len(mask)]] = False
        result.broken_by[prefix + name] = before - int(mask.sum())
        result.acc[prefix + name] = mask.float().mean().item()
    result.robust_acc = mask.float().mean().item()
    names = [label] if label else [prefix + name for name in broken]
    result.robust_attack = "+".join([result.robust_attack, *names])


def monotone_in_eps(results: dict[float, EvalResult]) -> None:
    """A point broken at a smaller ε is broken at every larger one (the same adversarial lies
    in the larger ball): robust accuracy never rises with ε, on the points both evaluated."""
    ordered = sorted(results.values(), key=lambda r: r.eps)
    for i, big in enumerate(ordered[1:], start=1):
        lost = torch.zeros_like(big.robust_mask)
        for small in ordered[:i]:
            n = min(small.n, big.n)
            lost[:n] |= big.robust_mask[:n] & ~small.robust_mask[:n]
        if lost.any():
            count_broken(big, {SMALLER_EPS: lost.nonzero().squeeze(1)})


__all__ = ["EvalResult", "EvalSpec", "Report", "Shard", "benchmark", "evaluate", "build_attacks",
           "make_attack", "parse_attack", "check_attacks", "check_eps", "eps_label", "parse_eps",
           "default_eval_eps", "large_eps", "predict_labels", "EvalConfigError", "PRESETS",
           "count_broken", "monotone_in_eps", "EARLIER",
           "FAST", "STANDARD", "REDUCED", "DEFAULT_EVAL_EPS", "LARGE_EPS"]
