"""Adaptive-attack building blocks any defense can reuse (Athalye et al. 2018; Tramèr et al. 2020).

- ``BPDA``: PGD whose forward pass runs through the whole defended model while the backward pass
  treats one named preprocessing submodule as the identity (Backward Pass Differentiable
  Approximation with g(x) ≈ x). For preprocessing that is non-differentiable, shatters
  gradients, or is expensive to differentiate.
- ``EOTPGD``: PGD on the gradient averaged over K samples (Expectation over Transformation), for
  randomized predictors, or for deterministic ones through an explicit random ``transform``
  (e.g. ``gaussian_noise``: a smoothed gradient for step-like, piecewise-constant defenses).
- ``Transfer``: adversarials crafted on a surrogate (e.g. the undefended base model), judged
  on the defense: no gradient of the defense is used at all.
- ``smooth_relu``: inside the block every ReLU computes softplus_β instead. A gradient
  explanation ∇ₓz of a ReLU network is piecewise constant in x, so its own derivative is zero
  almost everywhere; the softplus network's is not (Dombrowski et al. 2019, "Explanations can
  be manipulated and geometry is to blame", attack saliency maps this way). BPDA surrogates of
  a defense that consumes an input gradient are built with it.

Every class is a ``defenses.attacks.Attack``: its output is projected onto the ε-ball and
[0,1], and the attacked model is frozen in eval mode for the duration. A randomized predictor
must therefore draw its randomness in eval mode for EOT to see it."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from defenses.attacks.base import Attack
from defenses.attacks.pgd import LOSSES, PGD, random_start

Transform = Callable[[torch.Tensor], torch.Tensor]


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The value of ``y`` (bit for bit) with the gradient of the identity with respect to ``x``."""
    return y.detach() + (x - x.detach())


def _submodule(model: nn.Module, step: str) -> nn.Module:
    try:
        return model.get_submodule(step)
    except AttributeError:
        raise ValueError(f"BPDA: {type(model).__name__} has no submodule {step!r} to bypass") from None


@contextlib.contextmanager
def identity_backward(model: nn.Module, step: str) -> Iterator[None]:
    """Inside the block, the submodule ``step`` of ``model`` keeps its forward output but
    passes gradients straight through to its (single tensor) input."""
    module = _submodule(model, step)

    def hook(_module, inputs, output):
        if output.shape != inputs[0].shape:
            raise ValueError(f"BPDA: step {step!r} maps {tuple(inputs[0].shape)} to "
                             f"{tuple(output.shape)}; the identity approximation needs equal shapes")
        return straight_through(inputs[0], output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class BPDA(PGD):
    """PGD-K through ``model`` with its submodule ``step`` replaced by the identity on the
    backward pass only. The name is ``bpda-pgd-K`` (``bpda-pgd_cw-K`` for the margin loss)."""

    def __init__(self, model: nn.Module, eps: float, step: str, steps: int = 20,
                 alpha: float | None = None, loss: str = "ce", restarts: int = 1):
        super().__init__(model, eps, steps=steps, alpha=alpha, loss=loss, restarts=restarts)
        _submodule(model, step)  # a wrong name fails at construction, not mid-evaluation
        self.step = step
        self.name = f"bpda-{self.name}"

    def forward(self, images, labels):
        with identity_backward(self.model, self.step):
            return super().forward(images, labels)


def gaussian_noise(sigma: float) -> Transform:
    """EOT transform x -> clip(x + N(0, σ²), 0, 1)."""
    if sigma < 0:
        raise ValueError(f"gaussian_noise: sigma={sigma} must be ≥ 0")

    def transform(x: torch.Tensor) -> torch.Tensor:
        return (x + sigma * torch.randn_like(x)).clamp(0.0, 1.0)

    return transform


class EOTPGD(Attack):
    """PGD-K whose step direction is the sign of the loss gradient averaged over ``samples``
    evaluations of ``model(transform(x + δ))``. Without ``transform`` the randomness must be
    the model's own (in eval mode); a deterministic model then gains nothing from K > 1."""

    def __init__(self, model: Callable, eps: float, steps: int = 20, samples: int = 8,
                 alpha: float | None = None, loss: str = "ce", transform: Transform | None = None):
        super().__init__(model, eps)
        if steps <= 0 or samples <= 0:
            raise ValueError(f"EOTPGD: steps={steps} and samples={samples} must be positive")
        if loss not in LOSSES:
            raise ValueError(f"EOTPGD: unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.steps, self.samples, self.loss, self.transform = steps, samples, loss, transform
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        prefix = "eot_pgd" if loss == "ce" else f"eot_pgd_{loss}"
        self.name = f"{prefix}-{steps}x{samples}"

    def expected_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_fn = LOSSES[self.loss]
        total = torch.zeros_like(x)
        for _ in range(self.samples):
            x = x.detach().requires_grad_(True)
            inp = self.transform(x) if self.transform is not None else x
            grad, = torch.autograd.grad(loss_fn(self.model(inp), y), x)
            total += grad
        return total / self.samples

    def forward(self, images, labels):
        delta = random_start(images, self.eps)
        for _ in range(self.steps):
            grad = self.expected_gradient(images + delta, labels)
            with torch.no_grad():
                delta = delta.add_(grad.sign_(), alpha=self.alpha).clamp_(-self.eps, self.eps)
                delta = (images + delta).clamp_(0.0, 1.0).sub_(images)
        return (images + delta).detach()


class Transfer(Attack):
    """Adversarials of ``attack`` (built on a surrogate model) handed to whatever judges them.
    ``self.model`` is the surrogate: the defense itself is never queried or differentiated."""

    def __init__(self, attack: Attack):
        super().__init__(attack.model, attack.eps)
        self.attack = attack
        self.name = f"transfer-{attack.name}"

    def forward(self, images, labels):
        return self.attack(images, labels)


def transfer_pgd(surrogate: nn.Module, eps: float, steps: int = 20, loss: str = "ce") -> Transfer:
    """The usual transfer attack: PGD-K (Madry step rule) on the surrogate."""
    return Transfer(PGD(surrogate, eps, steps=steps, loss=loss))


_RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)


class _SoftplusForReLU(TorchFunctionMode):
    """Every ReLU call (``nn.ReLU`` modules and ``F.relu``/``torch.relu`` alike) becomes
    softplus_β; an in-place ReLU returns a new tensor (callers use the return value)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return F.softplus(args[0], beta=self.beta)
        return func(*args, **(kwargs or {}))


def smooth_relu(beta: float = 10.0) -> contextlib.AbstractContextManager:
    """Inside the block ReLU is softplus_β (β → ∞: ReLU again). Only for BPDA surrogates: the
    forward values change by at most log(2)/β per activation."""
    if not beta > 0:
        raise ValueError(f"smooth_relu: beta={beta} must be > 0")
    return _SoftplusForReLU(float(beta))


__all__ = ["BPDA", "EOTPGD", "Transfer", "transfer_pgd", "gaussian_noise", "identity_backward",
           "straight_through", "smooth_relu"]
