"""Our own L∞ PGD (Madry et al.), used for training and evaluation.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so nothing
accumulates in the parameters' ``.grad`` and no parameter gradient is computed."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from defenses.attacks.base import Attack, autocast_passes, frozen_eval, input_gradient, uniform_like


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus true logit (summed over the batch)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.clone()
    wrong.scatter_(1, y[:, None], float("-inf"))
    return (wrong.amax(1) - true).sum()


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Summed, not averaged: the sign of the gradient is the same, and a per-example step
    # does not depend on the batch size.
    return F.cross_entropy(logits, y, reduction="sum")


LOSSES = {"ce": ce_loss, "cw": cw_margin_loss}


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the ε-ball around x, clipped to [0,1] (returned as the offset δ)."""
    delta = uniform_like(x, generator).mul_(2 * eps).sub_(eps)
    return (x + delta).clamp_(0.0, 1.0).sub_(x)


def pgd_steps(model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
              steps: int, random_start_: bool = True, loss: str = "ce",
              generator: torch.Generator | None = None,
              autocast: torch.dtype | None = None) -> torch.Tensor:
    """The PGD iteration itself, in whatever mode the caller left the model. ``autocast``: run
    the model's passes in that precision (a step only uses the gradient's sign); δ and the
    projection stay in x's dtype."""
    loss_fn = LOSSES[loss]
    delta = random_start(x, eps, generator) if random_start_ else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        with autocast_passes(x, autocast):
            logits = model(x + delta)
        grad = input_gradient(loss_fn(logits.float(), y), delta, autocast)
        with torch.no_grad():
            delta = delta.add_(grad.sign_(), alpha=alpha).clamp_(-eps, eps)
            delta = (x + delta).clamp_(0.0, 1.0).sub_(x)
    return (x + delta).detach()


def pgd(model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        random_start: bool = True, loss: str = "ce",
        generator: torch.Generator | None = None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """L∞ PGD: ``steps`` signed-gradient steps of size ``alpha`` inside the ε-ball, from a
    uniform random start. The model is attacked in eval mode and its mode restored after."""
    with frozen_eval(model):
        return pgd_steps(model, x, y, eps, alpha, steps, random_start, loss, generator, autocast)


class PGD(Attack):
    """PGD-K with step 2.5·ε/K (Madry et al.'s rule) unless ``alpha`` is given."""

    def __init__(self, model, eps, steps: int = 20, alpha: float | None = None,
                 loss: str = "ce", restarts: int = 1):
        super().__init__(model, eps)
        self.steps, self.loss, self.restarts = steps, loss, restarts
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        prefix = "pgd" if loss == "ce" else f"pgd_{loss}"
        self.name = f"{prefix}-{steps}"

    def forward(self, images, labels):
        if self.restarts == 1:
            # The bookkeeping below would return this run's output unchanged (fooled or not):
            # skipping it saves one forward pass per attack with identical results.
            return pgd_steps(self.model, images, labels, self.eps, self.alpha, self.steps,
                             True, self.loss)
        best = images.clone()
        still_correct = torch.ones(len(labels), dtype=torch.bool, device=images.device)
        for _ in range(self.restarts):
            adv = pgd_steps(self.model, images, labels, self.eps, self.alpha, self.steps,
                            True, self.loss)
            with torch.no_grad():
                fooled = self.model(adv).argmax(1) != labels
            take = fooled & still_correct
            best[take] = adv[take]
            still_correct &= ~fooled
            # keep the last restart for points no restart fooled (a valid adversarial anyway)
            best[still_correct] = adv[still_correct]
        return best


class BIM(PGD):
    """The Basic Iterative Method (Kurakin et al. 2017, "Adversarial examples in the physical
    world"; I-FGSM): PGD-K without the random start, ``alpha`` per step (default 2.5·ε/K, the
    Madry rule PGD uses here). The name is ``bim-K``. Images (N,C,H,W) in [0,1], labels (N,)."""

    def __init__(self, model, eps, steps: int = 10, alpha: float | None = None, loss: str = "ce"):
        super().__init__(model, eps, steps=steps, alpha=alpha, loss=loss)
        if steps <= 0:
            raise ValueError(f"BIM: steps={steps} must be positive")
        self.name = f"bim-{steps}" if loss == "ce" else f"bim_{loss}-{steps}"

    def forward(self, images, labels):
        return pgd_steps(self.model, images, labels, self.eps, self.alpha, self.steps, False, self.loss)


def pgd_restarts(model, eps, steps: int, restarts: int, loss: str = "ce") -> PGD:
    """PGD-K with R uniform random starts, a point counting as broken if any run breaks it
    (Madry et al.'s "K steps, R restarts" rows). Named ``pgd-KxR`` (``pgd_cw-KxR``), so it never
    shares a cascade name with the single-start ``pgd-K``."""
    if restarts <= 0:
        raise ValueError(f"pgd_restarts: restarts={restarts} must be positive")
    attack = PGD(model, eps, steps=steps, loss=loss, restarts=restarts)
    attack.name = f"{attack.name}x{restarts}"
    return attack
