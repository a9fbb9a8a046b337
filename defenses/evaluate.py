"""``benchmark(...)``: clean and worst-case robust accuracy of a defense (RobustBench style).

Attacks run as a cascade (AutoAttack style): each attack only sees the points every earlier
attack failed to break, so an example counts as robust only if it survives every attack in the
list, and strong attacks late in the list cost little. ``acc[attack]`` is the robust accuracy
after that attack and all before it. For detectors, a rejected clean input is an error and a
rejected adversarial input is defended."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import torch

from defenses import attacks as attack_lib
from defenses.attacks import check_images, frozen_eval
from defenses.base import Defense

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    clean_acc: float
    robust_acc: float
    robust_attack: str               # the attacks whose worst case robust_acc is
    acc: dict[str, float]            # robust accuracy after each attack of the cascade
    broken_by: dict[str, int]        # points each attack broke first
    clean_rejected: float            # fraction of clean inputs a detector rejected
    n: int
    seconds: float


def _predict(defense: Defense, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    preds, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits, rej = defense.predict(x[i:i + batch_size])
            preds.append(logits.argmax(1))
            rejected.append(rej if rej is not None else torch.zeros_like(preds[-1], dtype=torch.bool))
    return torch.cat(preds), torch.cat(rejected)


def benchmark(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float,
              attacks: Sequence[str], batch_size: int = 256, adaptive: bool = True) -> EvalResult:
    """Evaluate ``defense`` on (x, y) against ``attacks`` (names, see ``defenses.attacks``)
    at L∞ radius ``eps``, then (``adaptive``) against the defense's own adaptive attacks.
    The model is in eval mode throughout and its mode restored after."""
    check_images(x, "evaluation images")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps} outside [0,1]: ε is in input units, e.g. 8/255 or 0.3")
    start = time.perf_counter()
    predictor = defense.predictor()
    built = [attack_lib.make(a, predictor, eps) for a in attacks]  # fail on bad names first
    if adaptive:
        built += defense.adaptive_attacks(eps)
    with frozen_eval(defense.model):
        pred, rejected = _predict(defense, x, batch_size)
        robust = (pred == y) & ~rejected
        clean_acc = robust.float().mean().item()
        acc: dict[str, float] = {}
        broken_by: dict[str, int] = {}
        for attack in built:
            idx = robust.nonzero().squeeze(1)
            broken = 0
            for i in range(0, len(idx), batch_size):
                j = idx[i:i + batch_size]
                adv = attack(x[j], y[j])
                adv_pred, adv_rej = _predict(defense, adv, batch_size)
                fooled = (adv_pred != y[j]) & ~adv_rej
                robust[j[fooled]] = False
                broken += int(fooled.sum())
            acc[attack.name] = robust.float().mean().item()
            broken_by[attack.name] = broken
            log.debug("after %s: robust %.4f", attack.name, acc[attack.name])
    return EvalResult(
        clean_acc=clean_acc, robust_acc=robust.float().mean().item(),
        robust_attack="+".join(a.name for a in built), acc=acc, broken_by=broken_by,
        clean_rejected=rejected.float().mean().item(), n=len(y),
        seconds=time.perf_counter() - start)
