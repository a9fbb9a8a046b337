"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1): L∞ PGD with momentum whose step size starts at
2ε and halves at checkpoints where the loss stopped rising, restarting from the best point.

``APGD(model, eps, steps=100, loss="ce")`` is APGD-CE; ``loss="dlr"`` APGD-DLR;
``APGD(model, eps, steps, targets=K)`` is APGD-T, the targeted DLR loss run once per target
class, the K most likely wrong classes of the clean input in turn, each on the points the
earlier targets left unbroken (AutoAttack's standard version uses K = 9).

Arguments: images (N, C, H, W) in [0,1], labels (N,) int64; returns adversarial images of the
same shape within the ε-ball. One restart, random start (a uniform point of the ball scaled so
its largest coordinate is ε, as the authors' code does).

Early stopping: a point leaves the iteration as soon as the model misclassifies it, and its
misclassified iterate is returned. Each point's state (step size, best loss, checkpoint
tests) is its own, and an eval-mode model treats every example of a batch independently, so
the points still iterating follow exactly the path they would follow in a batch that kept
the broken ones; the attack is as strong as the authors' and costs what the unbroken points
cost (a 0 %-robust model: a few steps, not 100). Differences from the authors' code, none of
which changes a step: the loss history of the first checkpoint starts at the random start
(theirs compares the first step with a zero row), and a point that is misclassified at the
random start is returned there without a step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from defenses.attacks.base import Attack, uniform_like

MOMENTUM = 0.75      # α of Algorithm 1
RHO = 0.75           # a checkpoint halves the step where ≤ ρ of the window's steps raised the loss


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size may halve: the window starts at 22 % of the
    budget and shrinks by 3 % per checkpoint, to no less than 6 % (the authors' schedule)."""
    window, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], 0
    while at + window <= steps:
        at += window
        out.append(at)
        window = max(window - shrink, least)
    return out


def ce_per_example(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Difference of logits ratio: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3); with ``target`` t
    the targeted form −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2). Invariant to shifting and
    scaling the logits, so a saturated softmax does not flatten it."""
    z, _ = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        top_is_y = logits.argmax(1) == y
        other = torch.where(top_is_y, z[:, -2], z[:, -1])
        return -(zy - other) / (z[:, -1] - z[:, -3] + 1e-12)
    zt = logits.gather(1, target[:, None]).squeeze(1)
    return -(zy - zt) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


LOSSES = {"ce": ce_per_example, "dlr": dlr}


class APGD(Attack):
    """APGD-CE / APGD-DLR (``targets=0``) or APGD-T (``targets=K``), ``steps`` iterations per
    run, with early stopping (module docstring). ``seed`` makes the random starts repeatable."""

    def __init__(self, model: Callable, eps: float, steps: int = 100, loss: str = "ce",
                 targets: int = 0, seed: int | None = 0, name: str | None = None):
        super().__init__(model, eps)
        if loss not in LOSSES:
            raise ValueError(f"unknown APGD loss {loss!r}; valid: {', '.join(LOSSES)}")
        if targets and loss != "dlr":
            raise ValueError("APGD-T runs the targeted DLR loss: pass loss='dlr' with targets")
        self.steps, self.loss, self.targets, self.seed = steps, loss, targets, seed
        self.name = name or (f"apgd_t-{steps}x{targets}" if targets else f"apgd_{loss}-{steps}")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=images.device).manual_seed(self.seed)
        adv = images.clone()
        if not self.targets:
            return self._run(images, labels, None, adv, torch.arange(len(images), device=images.device), gen)
        with torch.no_grad():
            ranked = self.model(images).argsort(dim=1, descending=True)
        robust = torch.ones(len(images), dtype=torch.bool, device=images.device)
        for rank in range(1, min(self.targets, ranked.shape[1] - 1) + 1):
            idx = robust.nonzero().squeeze(1)
            if not len(idx):
                break
            self._run(images[idx], labels[idx], ranked[idx, rank], adv, idx, gen, robust)
        return adv

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             adv: torch.Tensor, where: torch.Tensor, gen: torch.Generator | None,
             robust: torch.Tensor | None = None) -> torch.Tensor:
        """One APGD run on (x, y); writes each point's adversarial (the misclassified iterate, or
        the best-loss one) into ``adv[where]`` and clears ``robust[where]`` for broken points."""
        loss_fn, eps = LOSSES[self.loss], self.eps
        t = uniform_like(x, gen).mul_(2).sub_(1)
        t = t / (t.flatten(1).abs().amax(1).view(-1, *[1] * (x.dim() - 1)) + 1e-12)
        cur = (x + eps * t).clamp(0.0, 1.0)
        state = _State(x, y, target, cur, where, self.steps, eps)
        state.evaluate(self.model, loss_fn, 0)
        state.adopt_best(initial=True)
        state.step = torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype)
        self._retire(state, adv, robust)
        marks = set(checkpoints(self.steps))
        last = 0
        for i in range(self.steps):
            if not state.n:
                break
            a = MOMENTUM if i > 0 else 1.0
            with torch.no_grad():
                s = state.step.view(-1, *[1] * (x.dim() - 1))
                z = state.project(state.cur + s * state.grad.sign())
                nxt = state.project(state.cur + a * (z - state.cur) + (1 - a) * (state.cur - state.prev))
            state.prev, state.cur = state.cur, nxt
            state.evaluate(self.model, loss_fn, i + 1)
            state.adopt_best()
            self._retire(state, adv, robust)  # before a checkpoint moves a point to its best
            if i + 1 in marks and state.n:
                state.checkpoint(i + 1, i + 1 - last)
                last = i + 1
        adv[state.where] = state.best_x
        return adv

    @staticmethod
    def _retire(state: "_State", adv: torch.Tensor, robust: torch.Tensor | None) -> None:
        fooled = state.fooled
        if fooled.any():
            adv[state.where[fooled]] = state.cur[fooled]
            if robust is not None:
                robust[state.where[fooled]] = False
            state.keep(~fooled)


class _State:
    """The per-point state of the points still iterating (row i of every tensor is one point)."""

    def __init__(self, x, y, target, cur, where, steps, eps):
        self.eps = eps
        self.x, self.y, self.target, self.cur, self.prev, self.where = x, y, target, cur, cur, where
        self.hist = torch.zeros(steps + 1, len(x), device=x.device)   # loss after each iteration
        self.best_loss = torch.full((len(x),), -math.inf, device=x.device)
        self.best_x, self.best_grad = cur, None
        self.best_at_check = self.best_loss
        self.halved_at_check = torch.ones(len(x), dtype=torch.bool, device=x.device)
        self.step = None

    @property
    def n(self) -> int:
        return len(self.x)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(v, self.x - self.eps), self.x + self.eps).clamp(0.0, 1.0)

    def evaluate(self, model, loss_fn, row: int) -> None:
        cur = self.cur.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(cur)
            loss = loss_fn(logits.float(), self.y, self.target)
            self.grad, = torch.autograd.grad(loss.sum(), cur)
        self.cur, self.loss = cur.detach(), loss.detach()
        self.fooled = logits.detach().argmax(1) != self.y
        self.hist[row] = self.loss

    def adopt_best(self, initial: bool = False) -> None:
        better = self.loss > self.best_loss
        self.best_loss = torch.where(better, self.loss, self.best_loss)
        mask = better.view(-1, *[1] * (self.x.dim() - 1))
        self.best_x = torch.where(mask, self.cur, self.best_x)
        self.best_grad = self.grad if initial else torch.where(mask, self.grad, self.best_grad)

    def checkpoint(self, at: int, window: int) -> None:
        """Halve the step of points whose loss rose in at most ρ of the window's steps, or whose
        step was not halved last time and whose best loss has not improved since; they restart
        from their best point and its gradient."""
        rises = (self.hist[at - window + 1:at + 1] > self.hist[at - window:at]).sum(0)
        halve = (rises <= RHO * window) | (~self.halved_at_check & (self.best_loss <= self.best_at_check))
        self.halved_at_check, self.best_at_check = halve, self.best_loss
        self.step = torch.where(halve, self.step / 2, self.step)
        mask = halve.view(-1, *[1] * (self.x.dim() - 1))
        self.cur = torch.where(mask, self.best_x, self.cur)
        self.grad = torch.where(mask, self.best_grad, self.grad)

    def keep(self, rows: torch.Tensor) -> None:
        for name in ("x", "y", "target", "cur", "prev", "where", "best_loss", "best_x", "best_grad",
                     "best_at_check", "halved_at_check", "step", "grad", "loss", "fooled"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])
        self.hist = self.hist[:, rows]
