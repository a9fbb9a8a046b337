"""Saliency methods: ``method(model, x, target, ...) -> map`` (same batch order as x).

Maps are raw (no normalization) unless a function says otherwise: each defense documents how it
normalizes. Functions with ``create_graph`` are differentiable with respect to the model's
parameters when asked, so a loss on the map can train the model (attention transfer)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from defenses.core.models import attention_module


def _score(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of the target logit (the predicted class when target is None)."""
    if target is None:
        target = logits.argmax(1)
    return logits.gather(1, target[:, None]).sum()


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
             create_graph: bool = False) -> torch.Tensor:
    """Vanilla gradient ∂Φ_target/∂x (Simonyan et al.), raw, same shape as x."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(_score(model(x), target), x, create_graph=create_graph)
    return grad


@contextlib.contextmanager
def capture_activation(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of the model's attention layer during forwards inside the block."""
    store: dict[str, torch.Tensor] = {}
    handle = attention_module(model).register_forward_hook(
        lambda module, inputs, output: store.__setitem__("act", output))
    try:
        yield store
    finally:
        handle.remove()


def _activation_and_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None,
                             create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, ∂Φ_target/∂A) at the model's attention layer, for the CAM family."""
    if not x.requires_grad:
        # a frozen model (requires_grad False everywhere) would leave A outside the graph
        x = x.detach().requires_grad_(True)
    with torch.enable_grad(), capture_activation(model) as store:
        logits = model(x)
        act = store["act"]
        grads, = torch.autograd.grad(_score(logits, target), act, create_graph=create_graph)
    return act, grads


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
             create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.) at the model's attention layer: ReLU(Σ_k w_k A^k) with
    w_k the spatial mean of ∂Φ_target/∂A^k. Returns (N, h, w) before upsampling, not
    normalized. With ``create_graph`` the map is differentiable w.r.t. the parameters."""
    act, grads = _activation_and_gradient(model, x, target, create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1))
    return cam if create_graph else cam.detach()


def _targets(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``target`` as a class index per input; the predicted class where it is None."""
    if target is not None:
        return target
    with torch.no_grad():
        return model(x).argmax(1)


# --- Guided Backprop ------------------------------------------------------------------------
class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients through positive activations
    (Springenberg et al.): ∂/∂x = 1[x > 0] · max(g, 0)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _GuidedReLUMode(TorchFunctionMode):
    # A torch-function mode catches nn.ReLU modules and functional F.relu calls alike: captum's
    # GuidedBackprop hooks nn.ReLU modules only, so on the ResNets here (which call F.relu) it
    # would silently return a partly unguided gradient. On small_cnn both agree (tested).
    # In-place variants return a new tensor: every model here uses the returned value.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def guided_backprop(model: nn.Module, x: torch.Tensor,
                    target: torch.Tensor | None = None) -> torch.Tensor:
    """Guided Backpropagation (Springenberg et al. 2015): the input gradient of the target
    logit with every ReLU's backward replaced by 1[x > 0]·max(g, 0). Raw, same shape as x."""
    target = _targets(model, x, target)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with _GuidedReLUMode():
            score = _score(model(x), target)
        grad, = torch.autograd.grad(score, x)
    return grad


# --- SmoothGrad, Integrated Gradients --------------------------------------------------------
def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
               samples: int = 16, noise_level: float = 0.15,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): mean of the vanilla gradient at ``samples`` points
    x + N(0, σ²), σ = ``noise_level`` · (x_max − x_min) = ``noise_level`` for images in [0,1]
    (the paper's 10-20 %). Signed (no absolute value, unlike captum's default Saliency), raw.
    The target is fixed from the clean input, so every noisy copy explains the same class."""
    if samples < 1 or noise_level < 0:
        raise ValueError(f"smoothgrad: samples={samples} must be ≥ 1 and noise_level={noise_level} ≥ 0")
    target = _targets(model, x, target)
    device = generator.device if generator is not None else x.device
    total = torch.zeros_like(x)
    for _ in range(samples):
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        total += gradient(model, x + noise_level * noise, target)
    return total / samples


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                         steps: int = 16, baseline: float = 0.0) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from a constant ``baseline`` image (black
    by default): (x − x₀) · ∫₀¹ ∂Φ_target/∂x(x₀ + a(x − x₀)) da, the integral by captum's
    Gauss-Legendre rule with ``steps`` nodes. Raw, same shape as x."""
    from captum.attr import IntegratedGradients

    if steps < 1:
        raise ValueError(f"integrated_gradients: steps={steps} must be ≥ 1")
    target = _targets(model, x, target)
    with torch.enable_grad():
        # one internal batch per integration node keeps memory at one forward of x
        attr = IntegratedGradients(model).attribute(
            x.detach(), baselines=baseline, target=target, n_steps=steps, internal_batch_size=len(x))
    return attr.detach()


# --- Grad-CAM++ -----------------------------------------------------------------------------
def grad_cam_pp(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018) at the model's attention layer:
    ReLU(Σ_k w_k A^k) with w_k = Σ_ij a^k_ij · ReLU(g^k_ij), g = ∂Φ_target/∂A and
    a^k_ij = g² / (2g² + Σ_ab A^k_ab · g³) (0 where the denominator is 0): the closed form
    for an exponential score, evaluated with the logit's first derivative as in the authors'
    code. Returns (N, h, w) before upsampling, not normalized."""
    act, grads = _activation_and_gradient(model, x, target, create_graph)
    g2 = grads.pow(2)
    denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * grads.pow(3)
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    alpha = torch.where(denom != 0, g2 / safe, torch.zeros_like(denom))
    weights = (alpha * torch.relu(grads)).sum(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1))
    return cam if create_graph else cam.detach()


def cam_box(cam: torch.Tensor, size: tuple[int, int], threshold: float = 0.15) -> torch.Tensor:
    """Bounding box of a class-activation map as a boolean mask (N, H, W): the map is upsampled
    bilinearly to ``size``, divided by its per-image maximum, and the box is the smallest
    axis-aligned rectangle holding every pixel ≥ ``threshold`` (the Grad-CAM papers' 15 %
    localization rule). An all-zero map has no box (all False)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"cam_box: threshold={threshold} must be in (0, 1]")
    up = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(1).view(-1, 1, 1)
    hot = (up >= threshold * peak) & (peak > 0)
    rows, cols = hot.any(2), hot.any(1)

    def span(m: torch.Tensor) -> torch.Tensor:
        # between the first and the last True along dim 1, inclusive
        return (m.int().cumsum(1) > 0) & (m.flip(1).int().cumsum(1).flip(1) > 0)

    return span(rows)[:, :, None] & span(cols)[:, None, :]


def grad_cam_pp_box(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                    threshold: float = 0.15) -> torch.Tensor:
    """The weak saliency map of SAT's Eq. 10 from a Grad-CAM++ bounding box: +1 for every
    pixel (all channels) inside the box of ``cam_box(grad_cam_pp(...))``, −1 outside.
    Same shape as x, values in {−1, +1}."""
    box = cam_box(grad_cam_pp(model, x, target), tuple(x.shape[-2:]), threshold)
    s = torch.where(box, 1.0, -1.0).to(x.dtype)
    return s[:, None].expand_as(x).contiguous()
