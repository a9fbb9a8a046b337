"""Real-time saliency masking model (Dabkowski & Gal, NeurIPS 2017), as adapted by the
model-based saliency detection paper (``shared/papers/001``, §3.3).

The masking model f_s(x, c) returns a mask in [0,1] of the image's size: the pixels the frozen
classifier needs to recognize class c. Its parts:

- **encoder**: the classifier's own features at its attention layer (the last convolutional
  block; frozen: its parameters never change, but gradients flow through it to the input so
  the white-box attacks can differentiate the mask);
- **class selector**: an embedding e_c of the class; the encoder features A are gated by
  σ(Σ_k e_c,k A_k) (the authors' selector module);
- **decoder**: a small upsampling decoder, conv → bilinear upsampling to the input size →
  concatenation with the image (the finest U-Net skip connection) → conv → sigmoid.
  Dabkowski & Gal's U-Net takes a skip from every encoder scale; the classifiers here name one
  feature layer (``attention_layer``), so the image itself is the only finer scale.

Training loss (paper 001's adaptation of Dabkowski & Gal's objective)::

    L = λ_area·AV(m) + λ_smooth·TV(m) − λ_pres·log f_c(Φ(x, m)) + λ_destr·f_c(Φ(x, 1−m))^p

AV is the mask average (to the power ``area_power``, as the authors' code does, which favours
sparse masks), TV the mean squared difference of neighbouring mask pixels (paper 001 drops TV:
its default weight is 0 here), f_c the classifier's softmax probability of class c, and
Φ(x, m) = m·x + (1−m)·a replaces the unselected pixels by an alternative a: with probability ½
a Gaussian blur of x, otherwise a random constant grey level plus Gaussian noise (the authors'
``apply_mask``, with its colour range and noise scaled from their [-1,1] images to [0,1]).
Paper 001 writes the preserver and destroyer terms with softmax probabilities (as above); the
authors' code uses C&W-style logit margins instead: this follows the paper. The model is
trained on clean images with their true labels; at use time the class is the classifier's
prediction (paper 001: no label leak)."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.attacks import frozen_eval
from defenses.saliency.maps import capture_activation


@dataclasses.dataclass(frozen=True)
class SaliencyLossWeights:
    area: float = 1.0          # λ_area
    smooth: float = 0.0        # λ_smooth (paper 001 omits the TV term)
    preserve: float = 1.0      # λ_pres
    destroy: float = 2.0       # λ_destr
    destroy_power: float = 0.3  # p (Dabkowski & Gal's λ4)
    area_power: float = 0.3    # the authors' code raises the mask to this power in AV

    def check(self) -> str | None:
        """None if usable, else the reason (one line) the weights are not."""
        for name in ("area", "smooth", "preserve", "destroy"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                return f"saliency loss weight {name}={v!r} must be a finite number ≥ 0"
        for name in ("destroy_power", "area_power"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                return f"saliency loss {name}={v!r} must be a finite number > 0"
        if self.preserve == 0 and self.destroy == 0:
            return "saliency loss: preserve and destroy weights are both 0 (the mask would learn nothing)"
        return None


def feature_channels(classifier: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Channels of the classifier's attention-layer output for one image of ``image_shape``."""
    param = next(classifier.parameters())
    x = torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype)
    with frozen_eval(classifier), torch.no_grad(), capture_activation(classifier) as store:
        classifier(x)
    return int(store["act"].shape[1])


class MaskingModel(nn.Module):
    """f_s(x, c): (N,C,H,W) images in [0,1] and (N,) classes -> (N,1,H,W) masks in [0,1].

    The classifier is held outside the module's parameters (a list), so ``state_dict`` holds
    the decoder and selector only and the encoder stays the guarded classifier itself."""

    def __init__(self, classifier: nn.Module, num_classes: int, image_shape: tuple[int, int, int],
                 width: int = 32):
        super().__init__()
        self._encoder = [classifier]
        channels = feature_channels(classifier, image_shape)
        self.selector = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.selector.weight, 0.0, 1.0 / math.sqrt(channels))
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(width + image_shape[0], width // 2, 3, padding=1),
                                    nn.ReLU(), nn.Conv2d(width // 2, 1, 1))

    @property
    def classifier(self) -> nn.Module:
        return self._encoder[0]

    def forward(self, x: torch.Tensor, classes: torch.Tensor,
                act: torch.Tensor | None = None) -> torch.Tensor:
        """``act``: the classifier's attention-layer output for x when the caller already ran
        the classifier on x (it is then not run a second time)."""
        if act is None:
            with capture_activation(self.classifier) as store:
                self.classifier(x)
            act = store["act"]
        gate = torch.sigmoid((act * self.selector(classes)[:, :, None, None]).sum(1, keepdim=True))
        h = self.bottleneck(act * gate)
        h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.refine(torch.cat([h, x], dim=1)))


# --- the loss ------------------------------------------------------------------------------

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur with reflect padding (kernel radius ⌈2σ⌉)."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-t.pow(2) / (2 * sigma * sigma))
    k1 = k1 / k1.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    out = F.conv2d(padded, k1.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k1.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def alternative_images(x: torch.Tensor, generator: torch.Generator | None = None,
                       blur_prob: float = 0.5, grey_range: float = 0.33,
                       noise_std: float = 0.055) -> torch.Tensor:
    """What Φ puts where the mask removes the image (Dabkowski & Gal's ``apply_mask``): a
    blurred copy (σ = side/14, their 11 px at 224 px scaled down) or a random grey plus noise."""
    n = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(device=x.device, dtype=x.dtype)

    grey = 0.5 + (rand(n, x.shape[1], 1, 1) - 0.5) * grey_range
    noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    flat = (grey + noise_std * noise).clamp(0.0, 1.0)
    blurred = gaussian_blur(x, sigma=x.shape[-1] / 14.0)
    use_blur = (rand(n, 1, 1, 1) < blur_prob).to(x.dtype)
    return use_blur * blurred + (1 - use_blur) * flat


def apply_mask(x: torch.Tensor, mask: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
    """Φ(x, m) = m·x + (1−m)·a."""
    return mask * x + (1 - mask) * alternative


def area_term(mask: torch.Tensor, power: float) -> torch.Tensor:
    # the authors' +0.0005 keeps the derivative of m^p finite at m = 0
    return (mask + 5e-4).pow(power).mean() if power != 1 else mask.mean()


def smoothness_term(mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring mask pixels."""
    dy = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).pow(2).mean()
    dx = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).mean()
    return dx + dy


def saliency_loss(classifier: nn.Module, x: torch.Tensor, classes: torch.Tensor,
                  mask: torch.Tensor, w: SaliencyLossWeights,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and its terms (as floats, for logging)."""
    alt = alternative_images(x, generator)
    preserved = F.log_softmax(classifier(apply_mask(x, mask, alt)), 1).gather(1, classes[:, None])
    destroyed = F.softmax(classifier(apply_mask(x, 1 - mask, alt)), 1).gather(1, classes[:, None])
    terms = {"area": area_term(mask, w.area_power), "smooth": smoothness_term(mask),
             "preserve": -preserved.mean(), "destroy": destroyed.clamp_min(1e-12).pow(w.destroy_power).mean()}
    total = (w.area * terms["area"] + w.smooth * terms["smooth"]
             + w.preserve * terms["preserve"] + w.destroy * terms["destroy"])
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def train_masking_model(masker: MaskingModel, x: torch.Tensor, y: torch.Tensor,
                        weights: SaliencyLossWeights, epochs: int, batch_size: int = 100,
                        lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Train the decoder and selector on clean images (true labels) with the classifier frozen
    in eval mode; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(masker.parameters(), lr=lr)
    history = []
    masker.train()
    with frozen_eval(masker.classifier):
        for _ in range(epochs):
            total, n = 0.0, 0
            for idx in _batches(len(y), batch_size, generator):
                idx = idx.to(x.device)
                xb, yb = x[idx], y[idx]
                loss, _ = saliency_loss(masker.classifier, xb, yb, masker(xb, yb), weights, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"masking model loss became {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(yb)
                n += len(yb)
            history.append(total / max(n, 1))
    masker.eval()
    return history


@torch.no_grad()
def evaluate_masking_model(masker: MaskingModel, x: torch.Tensor, y: torch.Tensor,
                           weights: SaliencyLossWeights, batch_size: int = 250,
                           seed: int = 0) -> dict[str, float]:
    """Mean loss, its terms, and how the classifier fares on preserved / destroyed images."""
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    n = 0
    masker.eval()
    with frozen_eval(masker.classifier):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            mask = masker(xb, yb)
            loss, terms = saliency_loss(masker.classifier, xb, yb, mask, weights, generator)
            alt = alternative_images(xb, generator)
            terms["loss"] = loss.item()
            terms["mask_mean"] = mask.mean().item()
            terms["preserved_acc"] = (masker.classifier(apply_mask(xb, mask, alt)).argmax(1) == yb).float().mean().item()
            terms["destroyed_acc"] = (masker.classifier(apply_mask(xb, 1 - mask, alt)).argmax(1) == yb).float().mean().item()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(yb)
            n += len(yb)
    return {k: v / max(n, 1) for k, v in sums.items()}
