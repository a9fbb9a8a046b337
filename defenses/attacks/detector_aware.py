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
- ``JointSquare``: the Square Attack (Andriushchenko et al. 2020, "Square Attack: a
  query-efficient black-box adversarial attack via random search") on the joint decision:
  random search until ``defended_margin`` = max(true logit − best wrong logit, score) ≤ 0,
  i.e. misclassified and accepted, first lowering the classifier margin, then, once
  misclassified, the detector score (see ``JointSquare._margin``). It uses no gradient, so
  it reaches detectors whose score gives the gradient attacks nothing to follow (a rounding
  step, a label comparison, an input-gradient feature of a ReLU network), as Tramèr et al.
  2020 ("On adaptive attacks to adversarial example defenses") advise for any detector.

Both gradient attacks take ``restarts``: the first run starts from the clean image (as the
authors'), each further one from a uniform random point of the ε-ball, on the examples no run
has evaded yet; a fixed start on a detector's flat or jagged score gets stuck where another
start does not.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.attacks.base import Attack
from defenses.attacks.pgd import random_start

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


def defended_margin(logits: torch.Tensor, score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) max(true logit − best wrong logit, detector score): > 0 while the input is
    classified correctly or rejected, ≤ 0 once it is misclassified *and* accepted (an exact
    logit tie counts as evaded, where argmax may pick either class)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return torch.maximum(true - _best_other(logits, [y]), score)


def _box(images: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (images - eps).clamp(0.0, 1.0), (images + eps).clamp(0.0, 1.0)


def _check_restarts(restarts: int, what: str) -> None:
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"{what}: restarts={restarts!r} must be an integer ≥ 1")


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example bool mask shaped to broadcast over ``like``'s NCHW rows."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def restarted(run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              succeeded: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              images: torch.Tensor, labels: torch.Tensor, eps: float, restarts: int) -> torch.Tensor:
    """``run(images, labels, start)`` from the clean images, then ``restarts - 1`` times from a
    uniform random point of the ε-ball on the examples ``succeeded(adv, labels)`` says no run
    has won yet. Where no run wins, the first run's output stands."""
    best = run(images, labels, images.clone())
    if restarts == 1:
        return best
    done = succeeded(best, labels)
    for _ in range(restarts - 1):
        idx = (~done).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xi, yi = images[idx], labels[idx]
        adv = run(xi, yi, xi + random_start(xi, eps))
        won = succeeded(adv, yi)
        best[idx[won]] = adv[won]
        done[idx[won]] = True
    return best


class ExtraClassCW(Attack):
    """C&W-L2 inside the L∞ ε-ball, with the detector as class K+1 (``extra_class=True``) or
    on the classifier alone (``extra_class=False``: the non-adaptive reference, which also
    accepts a bare classifier returning logits). Success = misclassified and, with the extra
    class, accepted. C&W keep the smallest-L2 success over the binary search; with
    ``early_stop`` an example leaves the optimization at its first success instead (in an L∞
    threat model its L2 does not matter, and robust accuracy only asks whether one exists).
    ``restarts``: whole binary searches, the first from the clean image, the others from random
    points of the ε-ball (the L2 term still pulls toward the clean image). Images (N,C,H,W) in
    [0,1], labels (N,); returns (N,C,H,W)."""

    def __init__(self, joint: JointModel, eps: float, steps: int = 50, search_steps: int = 3,
                 c: float = 1.0, lr: float | None = None, kappa: float = 0.0,
                 extra_class: bool = True, early_stop: bool = False, restarts: int = 1):
        super().__init__(joint, eps)
        _check_restarts(restarts, "ExtraClassCW")
        self.restarts = restarts
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

    def _succeeded(self, adv, labels):
        with torch.no_grad():
            logits, score = self._outputs(adv)
        return self._success(logits, score, labels)

    def forward(self, images, labels):
        return restarted(self._search, self._succeeded, images, labels, self.eps, self.restarts)

    def _search(self, images, labels, start):
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
            found = self._optimize(images, labels, c, active, best, best_l2, start)
            # C&W's binary search on c: shrink it after a success, grow it (×10 until an upper
            # bound exists, then bisect) after a failure
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(upper < math.inf, (lower + upper) / 2, c * 10)
        return best

    def _optimize(self, images, labels, c, active, best, best_l2, start) -> torch.Tensor:
        """One C&W run at constants c over the ``active`` examples from ``start`` (Adam written
        out so that examples can leave mid-run); updates ``best``/``best_l2`` in place."""
        lo, hi = _box(images, self.eps)
        x = start.clone()
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
                # masked updates as torch.where over the active rows: boolean indexing would
                # wait for the GPU once per mask (the step's one wait is ``nonzero`` above)
                success = self._success(logits, score, labels[idx])
                better = success & (l2 < best_l2[idx])
                best[idx] = torch.where(_rows(better, xa), xa, best[idx])
                best_l2[idx] = torch.where(better, l2, best_l2[idx])
                found[idx] = found[idx] | success
                if self.early_stop:
                    active[idx] = active[idx] & ~success
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
    lowering the score, which a fixed threshold does not reward). ``restarts``: runs, the first
    from the clean image, the others from random points of the ε-ball. Images (N,C,H,W) in
    [0,1], labels (N,); returns (N,C,H,W)."""

    VARIANTS = ("orthogonal", "selective")

    def __init__(self, joint: JointModel, eps: float, steps: int = 50, alpha: float | None = None,
                 variant: str = "orthogonal", margin: float = 0.05, early_stop: bool = False,
                 restarts: int = 1):
        super().__init__(joint, eps)
        _check_restarts(restarts, "OrthogonalPGD")
        self.restarts = restarts
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

    def _succeeded(self, adv, labels):
        with torch.no_grad():
            logits, score = self.model(adv)
        return (logits.argmax(1) != labels) & (score <= 0)

    def forward(self, images, labels):
        return restarted(self._run, self._succeeded, images, labels, self.eps, self.restarts)

    def _run(self, images, labels, start):
        x = start.clone()
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
            xi = x[idx]
            best_score[idx] = torch.where(keep, score.detach(), best_score[idx])
            # kept rows take the iterate; so do rows unfooled so far (the latest stands in)
            take = keep | (best_score[idx] == math.inf)
            best[idx] = torch.where(_rows(take, xi), xi, best[idx])
            if self.early_stop:  # torch.where and index writes: no wait for the GPU per mask
                active[idx] = active[idx] & ~(fooled & (score <= 0))
            if i < self.steps:
                x[idx] = self._step(x[idx], images[idx], labels[idx], logits, g_cls, g_det)
        return best


class _ParameterHolder(nn.Module):
    """A plain callable joint as a module: torchattacks reads the device off a parameter."""

    def __init__(self, fn: JointModel):
        super().__init__()
        self.fn = fn
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x):
        return self.fn(x)


class JointSquare(Attack):
    """Square Attack, L∞ (Andriushchenko et al. 2020), on a joint classifier+detector: random
    search over square-shaped ±2ε updates, keeping a candidate when it lowers the classifier
    margin or, once misclassified, the detector score (without undoing the misclassification),
    until ``defended_margin`` ≤ 0 (misclassified and accepted) or ``queries`` are spent.
    torchattacks' Square does the search (p_init, its p schedule rescaled to the budget,
    vertical-stripe start) with its classifier margin and loss replaced by these. ``restarts``: fresh searches on the examples
    not evaded yet. Name ``square_joint-Q``: a ``square-*`` attack for the gradient-masking
    checks, distinct from the spec's classifier-only ``square-Q``. Images (N,C,H,W) in [0,1],
    labels (N,); returns (N,C,H,W)."""

    def __init__(self, joint: JointModel, eps: float, queries: int = 1000, restarts: int = 1,
                 p_init: float = 0.8):
        super().__init__(joint, eps)
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"JointSquare: queries={queries!r} must be an integer ≥ 1")
        _check_restarts(restarts, "JointSquare")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"JointSquare: p_init={p_init!r} must be in (0, 1]")
        self.queries, self.restarts, self.p_init = queries, restarts, p_init
        self.name = f"square_joint-{queries}"
        self._search = None

    def _margin(self, x, y):
        logits, score = self.model(x)
        logits, score = logits.float(), score.float()
        true = logits.gather(1, y[:, None]).squeeze(1)
        cls = true - _best_other(logits, [y])
        # Square's (margin, loss): the margin decides success (≤ 0: misclassified and
        # accepted); the loss it descends is lexicographic, first the classifier margin, then,
        # once misclassified, the detector score (softsign keeps the two phases apart, every
        # misclassified candidate below every correct one). The plain max(cls, score) walls
        # the search in wherever the detector rejects the inputs near the decision boundary
        # (low-confidence rejection, feature squeezing): lowering the classifier margin there
        # raises the score, so no single move lowers the max.
        loss = torch.where(cls > 0, 2 + F.softsign(cls), F.softsign(score))
        return torch.maximum(cls, score), loss

    def _searcher(self, device: torch.device):
        if self._search is None:
            from defenses.attacks.external import torchattacks  # loaded at first use

            module = self.model if isinstance(self.model, nn.Module) and \
                any(True for _ in self.model.parameters()) else _ParameterHolder(self.model)
            search = torchattacks.Square(module, norm="Linf", eps=self.eps, n_queries=self.queries,
                                         n_restarts=1, p_init=self.p_init, loss="margin")
            search.margin_and_loss = self._margin
            self._search = search
        self._search.device = device
        return self._search

    def forward(self, images, labels):
        search = self._searcher(images.device)
        search.init_hyperparam(images)
        best = images.clone()
        todo = torch.arange(len(labels), device=images.device)
        for _ in range(self.restarts):
            if len(todo) == 0:
                break
            # the search itself, not torchattacks' perturb(): perturb reseeds the global RNG
            # and keeps only points the classifier alone misclassifies
            _, adv = search.attack_single_run(images[todo], labels[todo])
            best[todo] = adv
            with torch.no_grad():
                margin, _ = self._margin(adv, labels[todo])
            todo = todo[margin > 0]
        return best
