"""Saliency methods: ``method(model, x, target, ...) -> map`` (same batch order as x).

Maps are raw (no normalization) unless a function says otherwise: each defense documents how it
normalizes. Functions with ``create_graph`` are differentiable with respect to the model's
parameters when asked, so a loss on the map can train the model (attention transfer)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from defenses.models import attention_module


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


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
             create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.) at the model's attention layer: ReLU(Σ_k w_k A^k) with
    w_k the spatial mean of ∂Φ_target/∂A^k. Returns (N, h, w) before upsampling, not
    normalized. With ``create_graph`` the map is differentiable w.r.t. the parameters."""
    with torch.enable_grad(), capture_activation(model) as store:
        logits = model(x)
        act = store["act"]
        grads, = torch.autograd.grad(_score(logits, target), act, create_graph=create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1))
    return cam if create_graph else cam.detach()
