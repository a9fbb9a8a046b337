"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): the largest L1 distance between the
classifier's softmax on x and on squeezed copies of x (bit depth, median smoothing, non-local
means), rejected above the threshold that rejects a fraction ``fpr`` of the clean validation
split (the threat model's FPR unless the hyperparameter says otherwise). The detector-aware
attacks descend the same score with rounding passed straight through (BPDA).
Squeezer semantics, defaults and results: docs/detectors.md."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from defenses.attacks.pgd import BIM
from defenses.core.base import DefenseConfigError
from defenses.core.detector import GuardDetector


@dataclasses.dataclass(frozen=True)
class FeatureSqueezingParams:
    bit_depth: int = 1       # 1-8 bits; 0 = no bit-depth squeezer
    median_size: int = 2     # window side ≥ 2; 0 = no median squeezer
    nlm_search: int = 0      # odd search window; 0 = no non-local means
    nlm_patch: int = 3       # odd patch side
    nlm_h: float = 4.0       # filter strength (0-255 units, as OpenCV)
    fpr: float | None = None  # fraction of clean validation inputs rejected; None: the threat model's


def bit_depth(x: torch.Tensor, bits: int, straight_through: bool = False) -> torch.Tensor:
    """Quantize to 2^bits levels; with ``straight_through`` the backward pass is the identity."""
    levels = 2 ** bits - 1
    q = torch.round(x * levels) / levels
    return x + (q - x).detach() if straight_through else q


def _symmetric_pad(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Pad H and W by repeating the edge-mirrored image (scipy's 'reflect': d c b a | a b c d)."""
    for dim in (2, 3):
        n = x.shape[dim]
        head = x.narrow(dim, 0, before).flip(dim) if before else x.narrow(dim, 0, 0)
        tail = x.narrow(dim, n - after, after).flip(dim) if after else x.narrow(dim, 0, 0)
        x = torch.cat([head, x, tail], dim=dim)
    return x


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over size×size windows, per channel (scipy.ndimage.median_filter semantics)."""
    n, c, h, w = x.shape
    padded = _symmetric_pad(x, size // 2, (size - 1) // 2)
    patches = F.unfold(padded, size).view(n, c, size * size, h * w)
    # scipy picks rank size²//2 of the sorted window: the upper median for an even window
    med = patches.sort(dim=2).values[:, :, (size * size) // 2]
    return med.view(n, c, h, w)


def non_local_means(x: torch.Tensor, search: int, patch: int, h: float) -> torch.Tensor:
    """Non-local means: each pixel becomes the average of the pixels of its search window,
    weighted by exp(-d/h²) with d the mean squared difference (0-255 units) of their patches."""
    rs, rp = search // 2, patch // 2
    n, c, hh, ww = x.shape
    padded = F.pad(x, (rs + rp,) * 4, mode="reflect")
    centre = padded[:, :, rs:rs + hh + 2 * rp, rs:rs + ww + 2 * rp]
    total = torch.zeros_like(x)
    weights = torch.zeros(n, 1, hh, ww, dtype=x.dtype, device=x.device)
    for dy in range(search):
        for dx in range(search):
            shifted = padded[:, :, dy:dy + hh + 2 * rp, dx:dx + ww + 2 * rp]
            d = F.avg_pool2d(((centre - shifted) * 255).pow(2).mean(1, keepdim=True), patch, stride=1)
            wgt = torch.exp(-d / (h * h))
            total = total + wgt * shifted[:, :, rp:rp + hh, rp:rp + ww]
            weights = weights + wgt
    return total / weights


def squeezers(params: FeatureSqueezingParams, straight_through: bool = False
              ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if params.bit_depth:
        out[f"bit_depth_{params.bit_depth}"] = lambda x: bit_depth(x, params.bit_depth, straight_through)
    if params.median_size:
        out[f"median_{params.median_size}x{params.median_size}"] = \
            lambda x: median_filter(x, params.median_size)
    if params.nlm_search:
        out[f"nlm_{params.nlm_search}-{params.nlm_patch}-{params.nlm_h:g}"] = \
            lambda x: non_local_means(x, params.nlm_search, params.nlm_patch, params.nlm_h)
    return out


class FeatureSqueezing(GuardDetector):
    name = "feature_squeezing"
    Params = FeatureSqueezingParams

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        self.threshold: float | None = None

    @classmethod
    def validate(cls, params):
        p, where = params, "feature_squeezing"
        if p.fpr is not None and not (isinstance(p.fpr, (int, float)) and 0.0 < p.fpr < 1.0):
            raise DefenseConfigError(f"{where}: fpr={p.fpr!r} must lie strictly between 0 and 1 "
                                     "(or be null: the threat model's fpr)")
        if not (isinstance(p.bit_depth, int) and 0 <= p.bit_depth <= 8):
            raise DefenseConfigError(f"{where}: bit_depth={p.bit_depth!r} must be an integer "
                                     "0-8 (0 = off)")
        if not (isinstance(p.median_size, int) and (p.median_size == 0 or 2 <= p.median_size <= 7)):
            raise DefenseConfigError(f"{where}: median_size={p.median_size!r} must be 0 (off) or "
                                     "an integer window side 2-7")
        if p.nlm_search:
            if not all(isinstance(v, int) and v > 0 and v % 2 == 1 for v in (p.nlm_search, p.nlm_patch)) \
                    or p.nlm_patch > p.nlm_search:
                raise DefenseConfigError(f"{where}: nlm_search={p.nlm_search!r}, nlm_patch="
                                         f"{p.nlm_patch!r} must be odd integers with patch ≤ search")
            if not (isinstance(p.nlm_h, (int, float)) and math.isfinite(p.nlm_h) and p.nlm_h > 0):
                raise DefenseConfigError(f"{where}: nlm_h={p.nlm_h!r} must be a number > 0")
        if not (p.bit_depth or p.median_size or p.nlm_search):
            raise DefenseConfigError(f"{where}: every squeezer is off; enable at least one of "
                                     "bit_depth, median_size, nlm_search")

    def raw_score(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """max over squeezers of ‖softmax f(x) - softmax f(squeeze(x))‖₁; rounding is passed
        straight through when x requires grad (the attacks' surrogate)."""
        straight = torch.is_grad_enabled() and x.requires_grad
        p = logits.softmax(1)
        dists = [(p - self.model(sq(x)).softmax(1)).abs().sum(1)
                 for sq in squeezers(self.params, straight).values()]
        return torch.stack(dists, 1).amax(1)

    def score(self, x, logits):
        if self.threshold is None:
            raise RuntimeError("feature_squeezing: the threshold is set by the first training "
                               "epoch (calibration on the clean validation split); run it first")
        return self.raw_score(x, logits) - self.threshold

    def calibrate(self, x: torch.Tensor | None = None) -> dict[str, float]:
        """Threshold = (1 - fpr) quantile of the clean scores of ``x`` (default: the
        validation split)."""
        self.threshold, scores = self.calibrate_score(self.raw_score, x)
        return {"threshold": self.threshold, "val_score_mean": scores.mean().item()}

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        # the classifier is not trained; the only thing learnt is the threshold, on the
        # validation split rather than on these batches (the classifier's training images)
        self.stop_training = True
        return self.calibrate()

    def state_dict(self):
        return {"threshold": self.threshold}

    def load_state_dict(self, state):
        self.threshold = state.get("threshold")

    def paper_attacks(self, eps: float) -> list:
        """Xu et al.'s MNIST attacks inside the L∞ threat model, detector-unaware on the guarded
        classifier: FGSM; BIM, 10 steps of ε/5 (their 0.06 at ε = 0.3); C&W∞ as PGD-100 on the
        C&W margin loss; C&W-L2 (100 Adam steps, projected onto the ε-ball); DeepFool (50
        steps, projected). Their targeted (next / least-likely class) variants, C&W0 and JSMA
        (L0 attacks) have no counterpart in an L∞ ball."""
        return ["fgsm", BIM(self.predictor(), eps, steps=10, alpha=eps / 5), "pgd_cw-100",
                "cw-100", "deepfool-50"]
