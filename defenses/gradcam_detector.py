"""Grad-CAM inconsistency detector (Ye et al., "Detection defense against adversarial attacks
with saliency map").

The subject-emphasis image e = x + θ·S(x), S the normalized Grad-CAM of the predicted class,
optionally enhanced (colour reversing, zero mean); the paper's rule (``rule="paper"``) rejects
x when the classifier labels e differently, the default ``rule="margin"`` thresholds the label
margin of e at a stated FPR on the validation split, like every detector of the project. The
margin is also the score for AUROC and the surrogate the detector-aware attacks descend.
What the paper leaves open and how it is decided here: docs/detectors.md."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from defenses.core.base import DefenseConfigError
from defenses.core.detector import GuardDetector
from defenses.saliency.maps import grad_cam

ENHANCEMENTS = ("none", "color_reverse", "zero_mean")
RULES = ("margin", "paper")  # threshold the margin at a stated FPR | the paper's label comparison


@dataclasses.dataclass(frozen=True)
class GradCAMDetectorParams:
    theta: float = 0.1           # proportion of the saliency map in the emphasis image
    enhancement: str = "none"    # none | color_reverse | zero_mean
    rule: str = "margin"         # margin: threshold at a stated FPR | paper: label comparison
    fpr: float | None = None     # margin rule's FPR; None: the threat model's


def normalized_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                   create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM of ``target`` (default: predicted class), bilinearly upsampled to x's size and
    divided by its per-image maximum, so the peak is 1 (an all-zero map stays 0): (N,1,H,W)."""
    if not x.requires_grad:  # Grad-CAM needs a graph from x, even when x itself needs no grad
        x = x.detach().requires_grad_(True)
    cam = grad_cam(model, x, target, create_graph=create_graph)[:, None]
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def emphasis_image(x: torch.Tensor, cam: torch.Tensor, theta: float) -> torch.Tensor:
    """x + θ·CAM on every channel, clipped to the image range."""
    return (x + theta * cam).clamp(0.0, 1.0)


def color_reverse(x: torch.Tensor) -> torch.Tensor:
    """RGB → BGR (the channel order reversed)."""
    return x.flip(1)


def zero_mean(x: torch.Tensor) -> torch.Tensor:
    """Each channel minus its mean over the image."""
    return x - x.mean(dim=(2, 3), keepdim=True)


_ENHANCE = {"none": lambda x: x, "color_reverse": color_reverse, "zero_mean": zero_mean}


def logit_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the logit of ``label``: > 0 iff argmax ≠ label (up to ties)."""
    own = logits.gather(1, label[:, None]).squeeze(1)
    other = logits.scatter(1, label[:, None], float("-inf")).amax(1)
    return other - own


class GradCAMDetector(GuardDetector):
    name = "gradcam_detector"
    Params = GradCAMDetectorParams

    @classmethod
    def validate(cls, params):
        if not isinstance(params.theta, (int, float)) or not math.isfinite(params.theta) \
                or params.theta < 0:
            raise DefenseConfigError(f"gradcam_detector: theta={params.theta!r} must be a finite "
                                     "number ≥ 0 (the paper sweeps 0.0-0.5)")
        if params.rule not in RULES:
            raise DefenseConfigError(f"gradcam_detector: unknown rule {params.rule!r}; valid: "
                                     f"{', '.join(RULES)}")
        if params.rule == "paper" and params.fpr is not None:
            raise DefenseConfigError(f"gradcam_detector: fpr={params.fpr!r} with rule 'paper': the "
                                     "label comparison has no threshold; drop fpr or use rule 'margin'")
        if params.fpr is not None and not (isinstance(params.fpr, (int, float))
                                           and 0.0 < params.fpr < 1.0):
            raise DefenseConfigError(f"gradcam_detector: fpr={params.fpr!r} must lie strictly "
                                     "between 0 and 1 (or be null: the threat model's fpr)")
        if params.enhancement not in ENHANCEMENTS:
            raise DefenseConfigError(f"gradcam_detector: unknown enhancement "
                                     f"{params.enhancement!r}; valid: {', '.join(ENHANCEMENTS)}")

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        # the paper's rule is the margin's sign; the margin rule's threshold is set by train_epoch
        self.threshold: float | None = 0.0 if params.rule == "paper" else None

    def needs_validation(self) -> bool:
        return self.params.rule != "paper"

    def setup(self, data, base_checkpoint):
        if self.params.enhancement == "color_reverse" and data.in_channels != 3:
            raise DefenseConfigError(
                f"gradcam_detector: enhancement 'color_reverse' (RGB→BGR) needs 3-channel images; "
                f"{data.name} has {data.in_channels} channel(s), where it would be the identity")
        super().setup(data, base_checkpoint)

    def probe_image(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """T(x + θ·CAM_label(x)); differentiable in x (second order through the CAM) when x
        requires grad."""
        differentiable = torch.is_grad_enabled() and x.requires_grad
        e = x
        if self.params.theta > 0:
            cam = normalized_cam(self.model, x, label, create_graph=differentiable)
            e = emphasis_image(x, cam, self.params.theta)
        return _ENHANCE[self.params.enhancement](e)

    def margin(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Best other logit of T(e) minus its logit of x's label: > 0 iff the labels differ."""
        label = logits.argmax(1).detach()
        return logit_margin(self.model(self.probe_image(x, label)), label)

    def score(self, x, logits):
        if self.threshold is None:
            raise RuntimeError("gradcam_detector: the margin rule's threshold is calibrated by the "
                               "first training epoch on the clean validation split; run it first")
        return self.margin(x, logits) - self.threshold

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        # no weights to learn; the margin rule's threshold is calibrated on the validation
        # split, not on these batches (the classifier's own training images)
        self.stop_training = True
        if self.params.rule == "paper":
            return {}
        return self.calibrate()

    def calibrate(self, x: torch.Tensor | None = None) -> dict[str, float]:
        """Margin threshold = (1 - fpr) quantile of the margins of ``x`` (default: the
        validation split)."""
        self.threshold, scores = self.calibrate_score(self.margin, x)
        return {"threshold": self.threshold, "val_margin_mean": scores.mean().item()}

    def state_dict(self):
        return {"threshold": self.threshold}

    def load_state_dict(self, state):
        if state:
            self.threshold = state.get("threshold")

    def paper_attacks(self, eps: float) -> list[str]:
        """Ye et al.'s attacks (Tables I-V), detector-unaware on the guarded classifier: FGSM
        and C&W-L2 (here untargeted, 50 Adam steps, projected onto the L∞ ε-ball; the paper's
        Carlini implementation runs its own targeted search with unstated budgets)."""
        return ["fgsm", "cw-50"]
