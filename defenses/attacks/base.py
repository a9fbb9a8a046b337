"""The one small attack contract (torchattacks style): ``attack(images, labels) -> adv_images``.

The model is put in eval mode and its parameters stop requiring gradients for the duration of
the attack, then both are restored exactly: attacks never change a model's state."""
from __future__ import annotations

import abc
import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def frozen_eval(model: Callable) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; every module's own flags restored after."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def autocast_passes(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Where an attack runs its model passes: under autocast in ``dtype`` on ``x``'s device, or
    in full precision for None (a training attack only needs the gradient's sign)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=dtype)


FP16_LOSS_SCALE = 2.0 ** 12


def input_gradient(loss: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """∂loss/∂inputs for a sign-based attack step whose passes ran under autocast in ``dtype``.
    In fp16 the backward pass underflows below 6e-8 and sign(0) = 0 leaves a pixel
    unperturbed (TRADES' first KL step, ~1e-6, dies entirely), so the loss is scaled up first,
    as AMP's GradScaler does: the sign does not see the scale. Where that overflows, the scale
    is cut by 16 until the gradient is finite. bf16 has fp32's range and needs none."""
    if dtype != torch.float16:
        return torch.autograd.grad(loss, inputs)[0]
    scale = FP16_LOSS_SCALE
    while True:
        grad, = torch.autograd.grad(loss * scale, inputs, retain_graph=scale > 1)
        if scale <= 1 or bool(torch.isfinite(grad).all()):
            return grad
        scale /= 16


def uniform_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1) noise shaped like x, on x's device. With a ``generator`` it is drawn on the
    generator's device and moved: torch refuses a CPU generator for CUDA draws, and a seeded
    CPU generator then gives the same start on the CPU and on any GPU."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def check_images(x: torch.Tensor, what: str = "inputs") -> None:
    """Images must lie in [0,1]; values outside are the usual sign of double normalization."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} lie in [{lo:.3g}, {hi:.3g}], not [0,1]: pass raw images in [0,1] "
                         "and keep normalization inside the model (double normalization?)")


class Attack(abc.ABC):
    """An L∞ attack of radius ``eps`` on ``model`` (any callable returning logits)."""

    name: str = "attack"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], eps: float):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps={eps} outside [0,1]: ε is in input units, e.g. 8/255 or 0.3")
        self.model = model
        self.eps = eps

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images for (images, labels); the model is already frozen in eval mode."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with frozen_eval(self.model):
            adv = self.forward(images, labels)
        # Every attack's output is projected onto the threat model: an attack that steps
        # outside the ε-ball (an L2 attack, a numerical slip) never counts beyond it.
        adv = torch.min(torch.max(adv.detach(), images - self.eps), images + self.eps)
        return adv.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, eps={self.eps:.4g})"
