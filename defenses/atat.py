"""ATAT: attention-transfer adversarial training (Li et al., "Adversarial Robustness via
Attention Transfer", Eq. 3-7).

The student trains on CE(x) + CE(x_adv) + λ₁·L_at + λ₂·L_lp: L_at compares the L2-normalized
Grad-CAM maps of a frozen standard teacher on clean images with the student's on clean and
PGD images (differentiated through the student's Grad-CAM, double backprop), L_lp the logits of
x and x_adv. With λ₁ = λ₂ = 0 it is ``pgd_at`` with ``clean_weight=1``.
The reading of the paper (normalization, initialization, the released code): docs/atat.md."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.core import models as model_lib
from defenses.attacks import pgd
from defenses.attacks.pgd import BIM
from defenses.core.base import BaseModelRequest, DefenseConfigError, LossDefense
from defenses.saliency.maps import grad_cam

log = logging.getLogger(__name__)

INITS = ("teacher", "random")
NORM_EPS = 1e-8  # floor of ‖v(A)‖₂ in the normalization (keeps all-zero maps at zero)


@dataclasses.dataclass(frozen=True)
class ATATParams:
    lambda1: float = 1.0   # weight of the attention-transfer loss L_at (Eq. 5)
    lambda2: float = 1.0   # weight of the logit-pairing loss L_lp (Eq. 6)
    init: str = "teacher"  # student initialization: "teacher" (the paper) or "random"


# ------------------------------------------------------------------------ the loss, pure functions
def normalized_attention(cam: torch.Tensor) -> torch.Tensor:
    """(N, h, w) Grad-CAM maps -> (N, h·w) unit vectors â = v(A) / max(‖v(A)‖₂, 1e-8)."""
    return F.normalize(cam.flatten(1), p=2.0, dim=1, eps=NORM_EPS)


def attention_loss(teacher_att: torch.Tensor, student_adv_att: torch.Tensor,
                   student_nat_att: torch.Tensor) -> torch.Tensor:
    """Eq. 5 with p = 2 on normalized maps: batch mean of ‖T − S_adv‖₂ + ‖T − S_nat‖₂."""
    return (torch.linalg.vector_norm(teacher_att - student_adv_att, dim=1)
            + torch.linalg.vector_norm(teacher_att - student_nat_att, dim=1)).mean()


def logit_pairing_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Eq. 6: batch mean of ‖S(x_ori) − S(x_adv)‖₂ (the paper's plain L2 norm, not squared)."""
    return torch.linalg.vector_norm(logits_nat - logits_adv, dim=1).mean()


def teacher_attention(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Normalized Grad-CAM of the frozen teacher for the true labels on clean inputs."""
    # The teacher's parameters do not require grad, so the input does: it gives autograd a
    # graph to the attention layer (only ∂y_c/∂A is computed, never a gradient w.r.t. x).
    x = x.detach().requires_grad_(True)
    return normalized_attention(grad_cam(teacher, x, y)).detach()


def cam_and_logits(model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's differentiable Grad-CAM for ``y`` and the logits of the same forward.

    Reusing Grad-CAM's forward for the CE and logit-pairing terms saves one forward per input
    and updates BatchNorm's running statistics once per input, as PGD-AT does."""
    store: dict[str, torch.Tensor] = {}
    handle = model.register_forward_hook(lambda module, inputs, out: store.__setitem__("out", out))
    try:
        cam = grad_cam(model, x, y, create_graph=True)
    finally:
        handle.remove()
    return cam, store["out"]


def student_outputs(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                    with_attention: bool) -> tuple[torch.Tensor, ...]:
    """(logits_adv, logits_nat, cam_adv, cam_nat); the maps are None without attention.
    The adversarial input goes first, as in pgd_at, so BatchNorm statistics evolve alike."""
    if not with_attention:
        return model(x_adv), model(x), None, None
    cam_adv, logits_adv = cam_and_logits(model, x_adv, y)
    cam_nat, logits_nat = cam_and_logits(model, x, y)
    return logits_adv, logits_nat, cam_adv, cam_nat


def atat_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
              teacher_att: torch.Tensor | None, lambda1: float,
              lambda2: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7 for one batch: (total loss, its detached parts). Terms with weight 0 are not
    computed at all, so λ₁ = λ₂ = 0 is exactly CE(nat) + CE(adv) at the cost of PGD-AT."""
    if lambda1 and teacher_att is None:
        raise ValueError("lambda1 > 0 needs the teacher's attention maps")
    logits_adv, logits_nat, cam_adv, cam_nat = student_outputs(model, x, x_adv, y, bool(lambda1))
    ce = F.cross_entropy(logits_adv, y) + F.cross_entropy(logits_nat, y)
    total, parts = ce, {"ce": ce.detach()}
    if lambda1:
        l_at = attention_loss(teacher_att, normalized_attention(cam_adv),
                              normalized_attention(cam_nat))
        total = total + lambda1 * l_at
        parts["l_at"] = l_at.detach()
    if lambda2:
        l_lp = logit_pairing_loss(logits_nat, logits_adv)
        total = total + lambda2 * l_lp
        parts["l_lp"] = l_lp.detach()
    return total, parts


# ------------------------------------------------------------------------ the defense
class ATAT(LossDefense):
    """ATAT changes training only: it predicts with the plain student, so the standard
    white-box attacks (PGD, PGD-CW, AutoAttack) are already the adaptive evaluation."""

    name = "atat"
    Params = ATATParams

    def __init__(self, model: nn.Module, params: ATATParams, threat):
        super().__init__(model, params, threat)
        self.check_model(model)
        self.teacher: nn.Module | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._batches = 0

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        check_attention_layer(model)

    @classmethod
    def validate(cls, params: ATATParams) -> None:
        for key in ("lambda1", "lambda2"):
            value = getattr(params, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise DefenseConfigError(f"atat: {key}={value!r} must be a finite number ≥ 0")
        if params.init not in INITS:
            raise DefenseConfigError(f"atat: init={params.init!r} must be one of {', '.join(INITS)}")

    @classmethod
    def base_model(cls, params: ATATParams) -> BaseModelRequest:
        return BaseModelRequest(defense="standard")

    def setup(self, data, base_checkpoint: Path | None) -> None:
        if base_checkpoint is None:
            raise DefenseConfigError("atat: needs a teacher checkpoint (base model 'standard'); "
                                     "none was given")
        device = next(self.model.parameters()).device
        self.teacher = load_teacher(base_checkpoint, self.model, data.name, data.num_classes,
                                    data.in_channels, device)
        if self.params.init == "teacher":
            getattr(self.model, "module", self.model).load_state_dict(self.teacher.state_dict())

    def loss(self, x, y, epoch):
        t = self.threat
        x_adv = pgd(self.model, x, y, t.eps, t.step_size, t.train_steps, autocast=t.attack_dtype)
        p = self.params
        t_att = teacher_attention(self.teacher, x, y) if p.lambda1 else None
        total, parts = atat_loss(self.model, x, x_adv, y, t_att, p.lambda1, p.lambda2)
        for key, value in parts.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._batches += 1
        return total

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        self._sums, self._batches = {}, 0
        metrics = super().train_epoch(batches, optimizer, epoch, scheduler)
        metrics.update({k: float(v) / max(self._batches, 1) for k, v in self._sums.items()})
        return metrics

    def paper_attacks(self, eps: float) -> list:
        """Tables 1-2 at the threat model's ε: FGSM, I-FGSM with 20 iterations ("FGSM(20)",
        BIM: no random start), PGD-7 and PGD-20 (CIFAR-10), PGD-10 (CIFAR-100), white-box and
        untargeted. Steps are the project's 2.5·ε/K (the paper gives only the training step)."""
        return ["fgsm", BIM(self.predictor(), eps, steps=20), "pgd-7", "pgd-10", "pgd-20"]


# ------------------------------------------------------------------------ checks and loading
def check_attention_layer(model: nn.Module) -> None:
    """DefenseConfigError (one line) when Grad-CAM has no layer to read in ``model``."""
    try:
        model_lib.attention_module(model)
    except model_lib.ModelError as e:
        raise DefenseConfigError(f"atat: {e}") from None


def load_teacher(path: Path, student: nn.Module, dataset: str, num_classes: int,
                 in_channels: int, device: torch.device) -> nn.Module:
    """The frozen teacher of ``path``, checked against the student's dataset and architecture."""
    state = torch.load(path, map_location=device, weights_only=True)
    meta = state.get("meta", {})
    student_arch = type(getattr(student, "module", student)).__name__
    mismatch = (f"atat: the teacher {path} is a {meta.get('model')!r} trained on "
                f"{meta.get('dataset')!r} but the student is a {student_arch} on {dataset!r}; "
                "the teacher must share the student's dataset and architecture")
    if (meta.get("dataset") != dataset or meta.get("num_classes") != num_classes
            or meta.get("in_channels") != in_channels):
        raise DefenseConfigError(mismatch)
    # Building initializes random weights: keep that off the global RNG so the trial's PGD
    # starts and batch draws are the same as a defense without a teacher (λ = 0 vs pgd_at).
    with torch.random.fork_rng(devices=[]):
        try:
            teacher = model_lib.build(meta.get("model", ""), num_classes, in_channels)
        except model_lib.ModelError:
            raise DefenseConfigError(mismatch) from None
    if not _same_architecture(teacher, student):
        raise DefenseConfigError(mismatch)
    teacher.load_state_dict(state["model"])
    teacher.to(device).eval().requires_grad_(False)
    check_attention_layer(teacher)
    log.info("atat: teacher %s (%s on %s) loaded frozen", path, meta.get("model"), dataset)
    return teacher


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    b = getattr(b, "module", b)
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
