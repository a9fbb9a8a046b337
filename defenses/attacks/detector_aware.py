"""Detector-aware (adaptive) attacks on a classifier guarded by a detector.

Both attacks take a **joint model**: an ``nn.Module`` (or callable) ``joint(x) -> (logits,
score)`` that is differentiable in x, where ``logits`` are the guarded classifier's (N, K)
logits and ``score`` (N,) is the detector's decision value *with its threshold subtracted*:
the detector rejects x exactly when ``score > 0``. A detector whose decision is not
differentiable (a label comparison, a quantizer) supplies a differentiable surrogate with the
same sign; each defense documents its own.

- ``ExtraClassCW``: Carlini & Wagner's attack on detectors ("Adversarial examples are not
  easily detected", 2017, §"perfect knowledge"): the detector becomes class K+1 of a combined
  classifier G and C&W-L2 looks for an input G assigns to a wrong class that is neither the
  true one nor "adversarial". C&W build ``G_{K+1} = (Z_D + 1) · max_j Z_j``, which only keeps
  its meaning when the best logit is positive; here ``G_{K+1} = max_j Z_j + score``, which has
  the same decision (class K+1 wins exactly when the detector rejects) for any logit sign.
  The objective is C&W's (‖δ‖₂² + c·f₆, Adam, binary search on c per example). The box
  [0,1] ∩ L∞ ε-ball is kept by projecting after every Adam step (the "projected gradient
  descent" box method C&W compare in their §V) rather than by their change of variables
  through tanh: that one starts every pixel sitting on the box edge at atanh(±0.999999), where
  its gradient vanishes, and on MNIST (most pixels 0, an edge of the box) it freezes most of the
  image for hundreds of steps, far beyond an affordable budget.
- ``OrthogonalPGD``: Bryniarski et al. 2022, "Evading adversarial example detection defenses
  with orthogonal projected gradient descent". While the classifier still predicts the true
  label, step on the classifier loss; once it is fooled, step to lower the detector score. In
  the ``orthogonal`` variant each of the two gradients first has its component along the other
  removed, so fooling the classifier does not raise the score and lowering the score does not
  undo the misclassification; ``selective`` skips the projections. L∞ steps use the sign of the
  chosen gradient, as in the authors' code. The example returned is, among iterates that fool
  the classifier, the one with the lowest detector score (the authors' rule).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from defenses.attacks.base import Attack

JointModel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def extra_class_logits(logits: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(N, K+1) logits: the classifier's K plus a "detected" class that wins iff score > 0."""
    return torch.cat([logits, (logits.amax(1) + score)[:, None]], dim=1)


def _best_other(logits: torch.Tensor, exclude: list[torch.Tensor]) -> torch.Tensor:
    """Largest logit over the classes not in ``exclude`` (each an (N,) index tensor)."""
    masked = logits.clone()
    for idx in exclude:
        masked = masked.scatter(1, idx[:, None], float("-inf"))
    return masked.amax(1)


def cw_loss(logits: torch.Tensor, score: torch.Tensor | None, y: torch.Tensor,
            kappa: float = 0.0) -> torch.Tensor:
    """C&W's f6 per example, untargeted. With a detector score, on the K+1 logits: the best
    class other than the true one and "detected" must beat both by κ."""
    if score is None:
        true = logits.gather(1, y[:, None]).squeeze(1)
        return torch.clamp(true - _best_other(logits, [y]), min=-kappa)
    g = extra_class_logits(logits, score)
    detected = torch.full_like(y, g.shape[1] - 1)
    blocked = torch.maximum(g.gather(1, y[:, None]).squeeze(1), g[:, -1])
    return torch.clamp(blocked - _best_other(g, [y, detected]), min=-kappa)


def _box(images: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (images - eps).clamp(0.0, 1.0), (images + eps).clamp(0.0, 1.0)


class ExtraClassCW(Attack):
    """C&W-L2 inside the L∞ ε-ball, with the detector as class K+1 (``extra_class=True``) or
    on the classifier alone (``extra_class=False``: the non-adaptive reference, which also
    accepts a bare classifier returning logits). Success = misclassified and, with the extra
    class, accepted. C&W keep the smallest-L2 success over the binary search; with
    ``early_stop`` an example leaves the optimization at its first success instead (in an L∞
    threat model its L2 does not matter, and robust accuracy only asks whether one exists)."""

    def __init__(self, joint: JointModel, eps: float, steps: int = 50, search_steps: int = 3,
                 c: float = 1.0, lr: float | None = None, kappa: float = 0.0,
                 extra_class: bool = True, early_stop: bool = False):
        super().__init__(joint, eps)
        # Adam moves each pixel by about lr per step: ε in about 10 steps
        lr = lr if lr is not None else max(0.1 * eps, 1e-4)
        if steps <= 0 or search_steps <= 0 or c <= 0 or lr <= 0 or kappa < 0:
            raise ValueError("ExtraClassCW needs steps, search_steps, c, lr > 0 and kappa ≥ 0")
        self.steps, self.search_steps, self.c0, self.lr, self.kappa = steps, search_steps, c, lr, kappa
        self.extra_class, self.early_stop = extra_class, early_stop
        self.name = f"cw_extra-{steps}x{search_steps}" if extra_class else f"cw_l2-{steps}x{search_steps}"

    def _success(self, logits, score, y):
        fooled = logits.argmax(1) != y
        return fooled & (score <= 0) if self.extra_class else fooled

    def _outputs(self, x):
        # the non-adaptive reference may be given the bare classifier (logits only)
        out = self.model(x)
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, images, labels):
        n = len(labels)
        c = torch.full((n,), self.c0, device=images.device, dtype=images.dtype)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, math.inf)
        best = images.clone()
        best_l2 = torch.full_like(c, math.inf)
        for _ in range(self.search_steps):
            active = best_l2 == math.inf if self.early_stop else torch.ones_like(labels, dtype=torch.bool)
            if not active.any():
                break
            found = self._optimize(images, labels, c, active, best, best_l2)
            # C&W's binary search on c: shrink it after a success, grow it (×10 until an upper
            # bound exists, then bisect) after a failure
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(upper < math.inf, (lower + upper) / 2, c * 10)
        return best

    def _optimize(self, images, labels, c, active, best, best_l2) -> torch.Tensor:
        """One C&W run at constants c over the ``active`` examples (Adam written out so that
        examples can leave mid-run); updates ``best``/``best_l2`` in place."""
        lo, hi = _box(images, self.eps)
        x = images.clone()
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        found = torch.zeros_like(active)
        active = active.clone()
        for t in range(1, self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xa = x[idx].requires_grad_(True)
            logits, score = self._outputs(xa)
            l2 = (xa - images[idx]).flatten(1).pow(2).sum(1)
            f = cw_loss(logits, score if self.extra_class else None, labels[idx], self.kappa)
            grad, = torch.autograd.grad((l2 + c[idx] * f).sum(), xa)
            with torch.no_grad():
                success = self._success(logits, score, labels[idx])
                better = success & (l2 < best_l2[idx])
                best[idx[better]], best_l2[idx[better]] = xa[better], l2[better]
                found[idx[success]] = True
                if self.early_stop:
                    active[idx[success]] = False
                x[idx] = self._adam(xa, grad, m, v, idx, t).clamp(lo[idx], hi[idx])
        return found

    def _adam(self, xa, grad, m, v, idx, t, beta1=0.9, beta2=0.999):
        """One Adam step (Kingma & Ba, torch's defaults) of rows ``idx``; m, v in place."""
        m[idx] = beta1 * m[idx] + (1 - beta1) * grad
        v[idx] = beta2 * v[idx] + (1 - beta2) * grad.pow(2)
        m_hat, v_hat = m[idx] / (1 - beta1 ** t), v[idx] / (1 - beta2 ** t)
        return xa - self.lr * m_hat / (v_hat.sqrt() + 1e-8)


def _remove_component(g: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """g minus its projection on ``along``, per example (Bryniarski et al.'s projection)."""
    gf, af = g.flatten(1), along.flatten(1)
    coef = (gf * af).sum(1, keepdim=True) / (af.pow(2).sum(1, keepdim=True) + 1e-20)
    return (gf - coef * af).view_as(g)


class OrthogonalPGD(Attack):
    """Orthogonal (or selective) PGD on a joint classifier+detector, L∞. With ``early_stop``
    an example leaves at its first iterate that is misclassified and accepted (the authors go on
    lowering the score, which a fixed threshold does not reward)."""

    VARIANTS = ("orthogonal", "selective")

    def __init__(self, joint: JointModel, eps: float, steps: int = 50, alpha: float | None = None,
                 variant: str = "orthogonal", margin: float = 0.05, early_stop: bool = False):
        super().__init__(joint, eps)
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(self.VARIANTS)}")
        if steps <= 0:
            raise ValueError("OrthogonalPGD needs steps > 0")
        self.steps, self.variant, self.margin, self.early_stop = steps, variant, margin, early_stop
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        self.name = f"{'opgd' if variant == 'orthogonal' else 'spgd'}-{steps}"

    def _gradients(self, x, labels):
        x = x.detach().requires_grad_(True)
        logits, score = self.model(x)
        g_cls, = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x,
                                     retain_graph=True)
        # ascend -score: lower the detector's suspicion
        g_det, = torch.autograd.grad(-score.sum(), x)
        return logits.detach(), score.detach(), g_cls, g_det

    def _step(self, x, images, labels, logits, g_cls, g_det):
        if self.variant == "orthogonal":
            g_cls, g_det = _remove_component(g_cls, g_det), _remove_component(g_det, g_cls)
        # "fooled" for the choice of step needs a margin, so the iterate does not sit on the
        # decision boundary (the authors add .05 to the true logit)
        bumped = logits.scatter_add(1, labels[:, None],
                                    torch.full_like(logits[:, :1], self.margin))
        crossed = (bumped.argmax(1) != labels).view(-1, *([1] * (x.dim() - 1)))
        step = torch.where(crossed, g_det, g_cls).sign()
        x = torch.min(torch.max(x + self.alpha * step, images - self.eps), images + self.eps)
        return x.clamp(0.0, 1.0)

    def forward(self, images, labels):
        x = images.clone()
        best = images.clone()
        best_score = torch.full((len(labels),), math.inf, device=images.device)
        active = torch.ones_like(labels, dtype=torch.bool)
        for i in range(self.steps + 1):  # the last pass only scores the final iterate
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            logits, score, g_cls, g_det = self._gradients(x[idx], labels[idx])
            fooled = logits.argmax(1) != labels[idx]
            keep = fooled & (score < best_score[idx])
            best[idx[keep]], best_score[idx[keep]] = x[idx[keep]], score[keep]
            never = idx[best_score[idx] == math.inf]
            best[never] = x[never]  # unfooled so far: the latest iterate stands in
            if self.early_stop:
                active[idx[fooled & (score <= 0)]] = False
            if i < self.steps:
                x[idx] = self._step(x[idx], images[idx], labels[idx], logits, g_cls, g_det)
        return best
