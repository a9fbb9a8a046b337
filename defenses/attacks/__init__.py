"""Attacks by name. A name is ``kind`` or ``kind-N`` where N is the attack's main budget
(steps, or queries for Square): ``fgsm``, ``pgd-40``, ``pgd_cw-30`` (PGD on the C&W margin),
``mim-10``, ``cw-50`` (C&W-L2), ``deepfool-50``, ``square-1000``, ``autoattack``."""
from __future__ import annotations

import re
from typing import Callable

from defenses.attacks import external
from defenses.attacks.base import Attack, check_images, frozen_eval
from defenses.attacks.pgd import PGD, pgd

__all__ = ["Attack", "PGD", "pgd", "make", "names", "parse", "check_images", "frozen_eval",
           "AttackNameError"]


class AttackNameError(ValueError):
    pass


def _pgd(model, eps, n=None):
    return PGD(model, eps, steps=n or 20)


def _pgd_cw(model, eps, n=None):
    return PGD(model, eps, steps=n or 30, loss="cw")


_FACTORIES: dict[str, Callable[..., Attack]] = {
    "fgsm": external.fgsm,
    "pgd": _pgd,
    "pgd_cw": _pgd_cw,
    "mim": external.mim,
    "cw": external.cw,
    "deepfool": external.deepfool,
    "square": external.square,
    "autoattack": external.autoattack,
}


def names() -> list[str]:
    return list(_FACTORIES)


def parse(name: str) -> tuple[str, int | None]:
    """``"pgd-40"`` -> ``("pgd", 40)``; unknown kinds raise with the valid ones listed."""
    m = re.fullmatch(r"([a-z_]+)(?:-(\d+))?", name.strip().lower())
    if not m or m.group(1) not in _FACTORIES:
        raise AttackNameError(f"unknown attack {name!r}; valid attacks: {', '.join(_FACTORIES)} "
                              "(optionally with a budget, e.g. pgd-40, square-5000)")
    n = int(m.group(2)) if m.group(2) else None
    if n is not None and n <= 0:
        raise AttackNameError(f"attack {name!r}: the budget after '-' must be positive")
    return m.group(1), n


def make(name: str, model: Callable, eps: float) -> Attack:
    kind, n = parse(name)
    return _FACTORIES[kind](model, eps, n)
