"""``GuardDetector``: the base class of a detector that guards a trained classifier without
training it (feature squeezing, the Grad-CAM detector, the model-based saliency detectors), and
``load_guarded_classifier``. Its metrics and the definitions they use (OSPA, FPR, detection
rate, AUROC) are ``defenses.evaluation.detection``."""
from __future__ import annotations

import abc
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from defenses import attacks as attack_lib
from defenses.attacks import Attack
from defenses.attacks.detector_aware import ExtraClassCW, JointSquare, OrthogonalPGD
from defenses.core import models as model_lib
from defenses.core.base import BaseModelRequest, Defense, DefenseConfigError, Prediction
from defenses.core.data import Dataset, as_float
from defenses.evaluation.detection import (calibrate_threshold, craft, detection_report,
                                           detector_metrics)

log = logging.getLogger(__name__)


# --- the classifier a detector guards -------------------------------------------------------

def load_guarded_classifier(model: nn.Module, checkpoint: Path | None, data: Dataset,
                            defense: str) -> dict:
    """Load the base classifier at ``checkpoint`` into ``model`` (the trial's architecture) and
    return the checkpoint's meta; a checkpoint trained for another dataset or classifier is a
    DefenseConfigError."""
    if checkpoint is None:
        raise DefenseConfigError(f"{defense}: needs the checkpoint of the classifier it guards "
                                 "(base model 'standard'); none was given")
    state = torch.load(checkpoint, map_location=next(model.parameters()).device, weights_only=True)
    meta = state.get("meta", {})
    if meta.get("dataset") != data.name or meta.get("num_classes") != data.num_classes \
            or meta.get("in_channels") != data.in_channels:
        raise DefenseConfigError(
            f"{defense}: classifier checkpoint {checkpoint} was trained on {meta.get('dataset')!r} "
            f"({meta.get('num_classes')} classes, {meta.get('in_channels')} channels), not on "
            f"{data.name!r} ({data.num_classes} classes, {data.in_channels} channels)")
    expected = type(model_lib.build(meta["model"], data.num_classes, data.in_channels)) \
        if meta.get("model") in model_lib.NAMES else None
    if expected is not type(model):
        raise DefenseConfigError(f"{defense}: classifier checkpoint {checkpoint} is a "
                                 f"{meta.get('model')!r}, the trial's model is {type(model).__name__}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise DefenseConfigError(f"{defense}: classifier checkpoint {checkpoint} does not fit the "
                                 f"trial's model: {str(e).splitlines()[0]}") from None
    model.eval()
    return meta


class _Joint(nn.Module):
    """``x -> (logits, score)`` for the detector-aware attacks; the classifier is a submodule
    so the attacks freeze it."""

    def __init__(self, classifier: nn.Module, detector: "GuardDetector"):
        super().__init__()
        self.classifier = classifier
        self._detector = [detector]  # a list: not registered as a submodule (no recursion)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(x)
        return logits, self._detector[0].score(x, logits)


class GuardDetector(Defense):
    """A detector guarding a classifier trained with standard training (the base model): it
    learns no weights, so an epoch only calibrates what the subclass needs and ends training.
    ``predict`` returns the classifier's logits and the detector's ``rejected`` flag.

    Subclasses give ``score(x, logits)``: a continuous decision value with the detector's
    threshold subtracted, differentiable in x when x requires grad (through a surrogate where
    the decision itself is not, e.g. straight-through rounding), and the detector rejects
    exactly when ``score > 0``. The adaptive attacks attack the classifier and this score
    together, so the attacks and ``predict`` see the same decision."""

    holdout_size = 200        # training images kept out of calibration: held-out checks
    # runs of each gradient detector-aware attack (the first from the clean image, the others
    # from random starts, only on the points still unbroken)
    ADAPTIVE_RESTARTS = 2
    # Square's queries per step of the budget (pgd-20 -> 100), never below SQUARE_MIN_QUERIES
    SQUARE_PER_STEP = 5
    SQUARE_MIN_QUERIES = 100

    def blackbox_attack(self, eps, queries):
        """Square on the whole decision, "misclassified and accepted", not on the classifier the
        detector guards: the masking checks judge the pipeline a user deploys."""
        return JointSquare(self.joint(), eps, queries=queries)

    def evaluation_metrics(self, x, y, attacks, batch_size=256):
        """FPR, OSPA and, per attack of the cascade, detection rate, fooled count, AUROC and TPR
        at the target FPR (``detector_metrics``)."""
        return detector_metrics(self, x, y, attacks, batch_size)

    @classmethod
    def base_model(cls, params) -> BaseModelRequest:
        return BaseModelRequest(defense="standard")

    @property
    def target_fpr(self) -> float:
        """The FPR the threshold is set at (and TPR is reported at): the detector's own ``fpr``
        hyperparameter when given, else the threat model's (the spec's ``threat_model.fpr``)."""
        own = getattr(self.params, "fpr", None)
        return self.threat.fpr if own is None else float(own)

    def needs_validation(self) -> bool:
        """Whether the detector sets a threshold on the validation split (False for a fixed
        decision rule)."""
        return True

    def setup(self, data, base_checkpoint):
        load_guarded_classifier(self.model, base_checkpoint, data, self.name)
        if self.needs_validation():
            self.val_x, self.val_y = self.validation_images(data)

    def validation_images(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split (float, on the model's device): clean images that neither the
        guarded classifier nor the detector trained on. Calibrating on the classifier's own
        training images, whose scores run lower, rejects more unseen clean inputs than stated."""
        if data.n_val == 0:
            raise DefenseConfigError(f"{self.name}: sets its threshold on the validation split, "
                                     "which is empty; set validation_samples > 0 in the spec")
        device = next(self.model.parameters()).device
        return as_float(data.val_x, device), data.val_y.to(device)

    def calibrate_score(self, raw_score, x: torch.Tensor | None = None,
                        batch_size: int = 256) -> tuple[float, torch.Tensor]:
        """(threshold at ``target_fpr``, the clean scores) of ``raw_score(x, logits)`` over
        ``x`` (default: the validation split)."""
        if x is None:
            if getattr(self, "val_x", None) is None:
                raise RuntimeError(f"{self.name}: no validation images to calibrate on; run setup first")
            x = self.val_x
        batches = ((x[i:i + batch_size], None) for i in range(0, len(x), batch_size))
        return calibrate_threshold(raw_score, self.model, batches, self.target_fpr)

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        # nothing to learn: the classifier is the base model and stays as it is
        self.stop_training = True
        return {}

    def end_epoch(self, epoch, holdout):
        """Held-out detector metrics after calibration: OSPA, FPR and FGSM detection."""
        if holdout is None:
            return {}
        x, y = holdout
        fgsm = attack_lib.make("fgsm", self.model, self.threat.eps)
        report = detection_report(self, x, y, craft([fgsm], x, y), fpr=self.target_fpr)
        return {f"holdout.{k}": v for k, v in report.as_metrics().items()}

    @abc.abstractmethod
    def score(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(N,) decision value minus threshold; > 0 means rejected."""

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, rejected, score) in one pass: rejected is ``score > 0``."""
        logits = self.model(x)
        score = self.score(x, logits)
        return logits, score > 0, score

    def predict(self, x):
        logits, rejected, _ = self.decide(x)
        return Prediction(logits, rejected)

    def detector_score(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous score (no gradient), for AUROC and TPR at a fixed FPR."""
        with torch.no_grad():
            return self.decide(x)[2].detach()

    def joint(self) -> nn.Module:
        return _Joint(self.model, self)

    def adaptive_budget(self) -> int:
        """Steps of the detector-aware attacks: those of the strongest iterative attack of the
        threat model (pgd-20 -> 20), so asking for stronger attacks strengthens them too."""
        return attack_lib.strongest_steps(self.threat.attacks)

    def full_strength(self, eps: float) -> bool:
        """Whether ``eps`` is the threat model's ε, the one of the trial's robust accuracy and of
        the gradient-masking checks. There the adaptive set is complete (restarts, Square, and
        whatever a subclass adds); at the robustness curve's other ε the gradient attacks run
        once and Square is left out. A detector keeps most points through its cascade at the
        curve's small ε, so those attacks there would double a detector trial's evaluation
        (measured in docs/detectors.md) for a curve drawn on a subset anyway."""
        return math.isclose(eps, self.threat.eps, rel_tol=1e-9, abs_tol=1e-12)

    def gradient_attacks(self, eps: float) -> list[Attack]:
        """Extra-class C&W (the budget split over 2 rounds of its search on c), then orthogonal
        PGD, both stopping per example at the first accepted misclassification, each with
        ``ADAPTIVE_RESTARTS`` runs at full strength (``full_strength``), one run otherwise."""
        k, joint = self.adaptive_budget(), self.joint()
        r = self.ADAPTIVE_RESTARTS if self.full_strength(eps) else 1
        return [ExtraClassCW(joint, eps, steps=max(k // 2, 1), search_steps=2, early_stop=True,
                             restarts=r),
                OrthogonalPGD(joint, eps, steps=k, early_stop=True, restarts=r)]

    def square_attack(self, eps: float) -> Attack:
        """Square on "misclassified and accepted" (``JointSquare``), 5 queries per budget step:
        gradient-free, so a detector whose score has no usable gradient cannot hide behind it."""
        queries = max(self.SQUARE_PER_STEP * self.adaptive_budget(), self.SQUARE_MIN_QUERIES)
        return JointSquare(self.joint(), eps, queries=queries)

    def adaptive_attacks(self, eps):
        """The gradient detector-aware attacks, then, at full strength, Square on the joint
        decision (last: it only runs on what the gradient attacks leave)."""
        extra = [self.square_attack(eps)] if self.full_strength(eps) else []
        return self.gradient_attacks(eps) + extra
