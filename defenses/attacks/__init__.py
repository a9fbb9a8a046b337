"""Attacks by name: the one vocabulary of the project. A name is ``kind``, ``kind-N`` (N: the
main budget, steps or Square's queries) or ``kind-NxK`` (K: target classes, for the targeted
kinds): ``fgsm``, ``pgd-40``, ``pgd_cw-30`` (PGD on the C&W margin), ``mim-10``, ``cw-50``
(C&W-L2), ``deepfool-50``, ``square-1000``, ``autoattack``, and AutoAttack's components
``apgd_ce-100``, ``apgd_dlr-100``, ``apgd_t-100x9``, ``fab_t-100x9``. The fixed presets (lists
of names) are here too; ``defenses.evaluation.benchmark`` adds the ones a defense decides (adaptive, paper)."""
from __future__ import annotations

import re
from typing import Callable, Iterable

from defenses.attacks import external
from defenses.attacks.apgd import APGD
from defenses.attacks.base import Attack, check_images, frozen_eval
from defenses.attacks.pgd import PGD, pgd

__all__ = ["Attack", "PGD", "pgd", "make", "names", "parse", "check_images", "frozen_eval",
           "AttackNameError", "PRESET_ATTACKS", "strongest_steps"]


class AttackNameError(ValueError):
    pass


def _pgd(model, eps, n=None, k=None):
    return PGD(model, eps, steps=n or 20)


def _pgd_cw(model, eps, n=None, k=None):
    return PGD(model, eps, steps=n or 30, loss="cw")


def _aa_targets(model: Callable, targets: int | None) -> int:
    # torchattacks attacks the top ``n_classes - 1`` other classes; AutoAttack uses all 9
    return targets if targets is not None else external._num_classes(model) - 1


def _apgd(loss: str):
    def factory(model, eps, n=None, k=None):
        return APGD(model, eps, steps=n or 100, loss=loss)
    return factory


def _apgd_t(model, eps, n=None, k=None):
    steps = n or 100
    # the name keeps what was asked: apgd_t-100 (no xK) means all other classes
    name = f"apgd_t-{steps}" + (f"x{k}" if k is not None else "")
    return APGD(model, eps, steps=steps, loss="dlr", targets=_aa_targets(model, k), name=name)


def _fab_t(model, eps, n=None, k=None):
    steps, targets = n or 100, _aa_targets(model, k)
    name = f"fab_t-{steps}" + (f"x{k}" if k is not None else "")
    return external.TorchAttacks(
        model, eps, name, lambda m, e: external.torchattacks.FAB(
            m, norm="Linf", eps=e, steps=steps, n_restarts=1, multi_targeted=True,
            n_classes=targets + 1, seed=0))


def _plain(factory: Callable[..., Attack]) -> Callable[..., Attack]:
    return lambda model, eps, n=None, k=None: factory(model, eps, n)


_FACTORIES: dict[str, Callable[..., Attack]] = {
    "fgsm": _plain(external.fgsm),
    "pgd": _pgd,
    "pgd_cw": _pgd_cw,
    "mim": _plain(external.mim),
    "cw": _plain(external.cw),
    "deepfool": _plain(external.deepfool),
    "square": _plain(external.square),
    "autoattack": _plain(external.autoattack),
    "apgd_ce": _apgd("ce"),
    "apgd_dlr": _apgd("dlr"),
    "apgd_t": _apgd_t,
    "fab_t": _fab_t,
}
TARGETED = ("apgd_t", "fab_t")  # the kinds that take an ``xK`` target count
# the kinds whose N counts gradient steps (the budget an adaptive attack matches)
ITERATIVE = ("pgd", "pgd_cw", "mim", "cw", "apgd_ce", "apgd_dlr", "apgd_t", "fab_t")
DEFAULT_STEPS = 20  # adaptive attacks' steps when nothing iterative is named

# APGD's step size adapts, so short, rough-surfaced trials are attacked as well as converged
# ones; targeted DLR finds most of what CE leaves (docs/evaluation.md, search-time cascade)
FAST = ("fgsm", "apgd_ce-20", "apgd_t-20x3")
STANDARD = ("apgd_ce-100", "apgd_t-100", "fab_t-100", "square-5000")
# AutoAttack standard's four attacks at budgets a CPU can afford on a whole sweep's front
REDUCED = ("apgd_ce-50", "apgd_t-50x3", "fab_t-50x3", "square-1000")
PRESET_ATTACKS: dict[str, tuple[str, ...]] = {"fast": FAST, "standard": STANDARD, "reduced": REDUCED}

_NAME = re.compile(r"([a-z_]+)(?:-(\d+)(?:x(\d+))?)?")


def names() -> list[str]:
    return list(_FACTORIES)


def parse(name: str) -> tuple[str, int | None, int | None]:
    """``"apgd_t-50x3"`` -> ``("apgd_t", 50, 3)``, ``"pgd-40"`` -> ``("pgd", 40, None)``;
    an unknown kind raises with the valid ones listed."""
    m = _NAME.fullmatch(str(name).strip().lower())
    if not m or m.group(1) not in _FACTORIES:
        raise AttackNameError(f"unknown attack {name!r}; valid attacks: {', '.join(_FACTORIES)} "
                              "(optionally with a budget, e.g. pgd-40, apgd_t-50x3)")
    kind = m.group(1)
    n, k = (int(g) if g else None for g in m.group(2, 3))
    if (n is not None and n <= 0) or (k is not None and k <= 0):
        raise AttackNameError(f"attack {name!r}: the budget after '-' and the target count "
                              "after 'x' must be positive")
    if k is not None and kind not in TARGETED:
        raise AttackNameError(f"attack {name!r}: only {', '.join(TARGETED)} take a target count")
    return kind, n, k


def make(name: str, model: Callable, eps: float) -> Attack:
    kind, n, k = parse(name)
    return _FACTORIES[kind](model, eps, n, k)


def strongest_steps(specs: Iterable[object], default: int = DEFAULT_STEPS) -> int:
    """Steps of the strongest iterative attack among ``specs`` (names, fixed presets by their
    attacks; anything else is skipped): the budget of a defense's adaptive attacks, so that
    asking for stronger attacks strengthens those too (pgd-20 -> 20, ``standard`` -> 100)."""
    steps = []
    for spec in (s for s in specs if isinstance(s, str)):  # built Attacks carry no name budget
        if spec in PRESET_ATTACKS:
            steps.append(strongest_steps(PRESET_ATTACKS[spec], default))
            continue
        try:
            kind, n, _ = parse(spec)
        except AttackNameError:  # other presets (adaptive, paper) decide their own budgets
            continue
        if kind in ITERATIVE:
            steps.append(n or default)
    return max(steps, default=default)
