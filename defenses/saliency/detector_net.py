"""What a model-based saliency detector looks at and learns with: the detector inputs (the
image with its logit gradient, saliency mask or Jacobian channel) and ``DetectorCNN``, the
small binary classifier trained on them (``detector_pass``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.saliency.masking import MaskingModel


def logit_gradient(model: nn.Module, x: torch.Tensor, classes: torch.Tensor,
                   logits: torch.Tensor | None = None) -> torch.Tensor:
    """∇_x z_c(x) per image. When x requires grad (an attack differentiating the detector),
    the gradient keeps its graph (``create_graph``) and reuses ``logits`` if given."""
    if torch.is_grad_enabled() and x.requires_grad:
        if logits is None:
            logits = model(x)
        grad, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x,
                                    create_graph=True, retain_graph=True)
        return grad
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(model(xg).gather(1, classes[:, None]).sum(), xg)
    return grad


def detector_input(kind: str, classifier: nn.Module, masker: MaskingModel | None,
                   x: torch.Tensor, logits: torch.Tensor | None = None,
                   act: torch.Tensor | None = None) -> torch.Tensor:
    """What detector ``kind`` sees for images x (classes: f's prediction). ``logits`` and
    ``act`` (the attention-layer output) may come from a classifier forward already run on x."""
    if kind == "id":
        return x
    if logits is None:
        with torch.no_grad():
            logits = classifier(x)
    classes = logits.argmax(1).detach()
    if kind == "jsd":
        return torch.cat([x, logit_gradient(classifier, x, classes, logits)], 1)
    mask = masker(x, classes, act)
    return mask if kind == "smd" else mask * x


def input_channels(kind: str, image_channels: int) -> int:
    return {"smd": 1, "spd": image_channels, "id": image_channels, "jsd": 2 * image_channels}[kind]


class DetectorCNN(nn.Module):
    """Small binary CNN: (N,C,H,W) detector input -> (N,) logit of "adversarial". Inputs are
    standardized per channel with statistics of the clean training inputs (``fit_scaling``):
    a Jacobian channel is orders of magnitude smaller than an image channel."""

    def __init__(self, in_channels: int, height: int, width: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, in_channels, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), 64),
                                  nn.ReLU(), nn.Linear(64, 1))

    @torch.no_grad()
    def fit_scaling(self, inputs: torch.Tensor) -> None:
        self.shift.copy_(inputs.mean(dim=(0, 2, 3), keepdim=True))
        self.scale.copy_(inputs.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((inputs - self.shift) / self.scale)).squeeze(1)


def detector_pass(net: DetectorCNN, opt: torch.optim.Optimizer, inputs: torch.Tensor,
                  labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """One epoch of binary cross-entropy over (inputs, labels ∈ {0,1}), both classes weighted
    equally (the adversarial class re-weighted by n_clean / n_adv). The set may live in host
    memory: each batch is moved to the network's device. The epoch's loss and accuracy are
    summed on that device and read once at the end (no wait for the GPU per step)."""
    device = next(net.parameters()).device
    n_adv = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - n_adv) / max(n_adv, 1.0), device=device)
    net.train()
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    order = torch.randperm(len(labels), generator=generator).to(inputs.device)
    for idx in order.split(batch_size):
        batch, target = inputs[idx].to(device), labels[idx].to(device)
        out = net(batch)
        loss = F.binary_cross_entropy_with_logits(out, target, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
        correct += ((out > 0).float() == target).sum()
    net.eval()
    n = max(len(labels), 1)
    return {"loss": total.item() / n, "train_acc": correct.item() / n}


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 250,
            device: torch.device | None = None) -> torch.Tensor:
    """``fn`` over x in chunks; with ``device``, each chunk runs there and its result comes
    back to x's device (what a detector keeps in host memory, computed on the GPU)."""
    if device is None:
        return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return torch.cat([fn(x[i:i + batch_size].to(device)).to(x.device) for i in range(0, len(x), batch_size)])


