"""The metrics of the detectors (defenses whose ``predict`` also returns ``rejected``); their
base class is ``defenses.core.detector.GuardDetector``.

Definitions (stated once here, used by every detector of the project):

- **OSPA** (Original Samples Prediction Accuracy, Ye et al.): fraction of clean inputs that
  are classified correctly *and* not rejected, i.e. the clean accuracy of the defended model
  (``benchmark``'s ``clean_acc``). The paper evaluates only originally correct samples, so its
  θ = 0 row reads 100 %; here it is over all clean inputs and starts at the classifier's own
  accuracy.
- **FPR**: fraction of clean inputs rejected.
- **Detection rate** of an attack: among the adversarial examples that fool the classifier
  (crafted from clean inputs it classifies correctly), the fraction the detector rejects
  (Xu et al. / Ye et al. count detections over successful adversarial examples).
- **AUROC** and **TPR at a fixed FPR**: from the detector's continuous score (higher = more
  suspicious), clean inputs (all of them) against the successful adversarial examples.
  The threshold for a stated FPR is the (1 - FPR) quantile of the clean scores.
- **Robust accuracy** of an attack (benchmark's rule): an input counts if it is accepted and
  correct when clean, and its adversarial version is rejected or still correct.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from defenses.attacks import Attack, frozen_eval
from defenses.core.base import Prediction

log = logging.getLogger(__name__)


@runtime_checkable
class ScoredDetector(Protocol):
    """What the metrics need: the model it guards, the decision, and a continuous score."""

    model: torch.nn.Module

    def predict(self, x: torch.Tensor) -> Prediction: ...

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, rejected, score) in one pass."""

    def detector_score(self, x: torch.Tensor) -> torch.Tensor: ...


def ospa(pred: torch.Tensor, y: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of clean inputs classified correctly and accepted."""
    return ((pred == y) & ~rejected).float().mean().item()


def detection_rate(rejected: torch.Tensor, fooled: torch.Tensor) -> float:
    """Fraction of the successful adversarial examples (``fooled``) that are rejected;
    NaN when the attack fooled nothing (there is nothing to detect)."""
    n = int(fooled.sum())
    return math.nan if n == 0 else (rejected & fooled).float().sum().item() / n


def roc_auc(clean_scores: torch.Tensor, adv_scores: torch.Tensor) -> float:
    """Area under the ROC curve = P(adv score > clean score) + ½ P(tie) (Mann-Whitney U with
    average ranks), so a score constant on both sets gives exactly 0.5."""
    if len(clean_scores) == 0 or len(adv_scores) == 0:
        return math.nan
    scores = torch.cat([clean_scores, adv_scores]).double().cpu()
    ranks = _average_ranks(scores)
    n_clean, n_adv = len(clean_scores), len(adv_scores)
    u = ranks[n_clean:].sum().item() - n_adv * (n_adv + 1) / 2
    return u / (n_clean * n_adv)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = values.argsort()
    sorted_vals = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    unique, inverse = torch.unique_consecutive(sorted_vals, return_inverse=True)
    if len(unique) < len(values):  # average the ranks inside each group of equal values
        sums = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, ranks[order])
        counts = torch.bincount(inverse, minlength=len(unique)).to(values.dtype)
        ranks[order] = (sums / counts)[inverse]
    return ranks


def threshold_at_fpr(clean_scores: torch.Tensor, fpr: float) -> float:
    """The (1 - fpr) quantile of clean scores: rejecting ``score > threshold`` flags a
    fraction ``fpr`` of inputs drawn like ``clean_scores`` (the 95th percentile at 5 %)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr={fpr} must lie strictly between 0 and 1")
    if len(clean_scores) == 0:
        raise ValueError("threshold_at_fpr needs at least one clean score")
    return torch.quantile(clean_scores.double().cpu(), 1.0 - fpr).item()


def tpr_at_fpr(clean_scores: torch.Tensor, adv_scores: torch.Tensor, fpr: float = 0.05) -> float:
    """Fraction of adversarial scores above the clean threshold for ``fpr``."""
    if len(adv_scores) == 0 or len(clean_scores) == 0:
        return math.nan
    tau = threshold_at_fpr(clean_scores, fpr)
    return (adv_scores.double().cpu() > tau).float().mean().item()


def calibrate_threshold(raw_score, model: nn.Module, batches, fpr: float
                        ) -> tuple[float, torch.Tensor]:
    """(threshold at ``fpr``, the clean scores) of ``raw_score(x, logits)`` over clean
    ``batches`` (a detector's validation split: images the classifier never trained on), the
    model frozen in eval mode."""
    scores = []
    with frozen_eval(model), torch.no_grad():
        for x, _ in batches:
            scores.append(raw_score(x, model(x)).cpu())
    scores = torch.cat(scores)
    return threshold_at_fpr(scores, fpr), scores


# --- evaluating a detector on clean inputs and on fixed adversarial sets ---------------------

@dataclasses.dataclass
class AttackDetection:
    attack: str
    attacked: int           # clean inputs the classifier got right, hence attacked
    fooled: int             # adversarial examples that fool the classifier
    detection_rate: float   # fooled ones rejected
    auroc: float            # detector score: clean vs fooled adversarial
    tpr_at_fpr: float       # at the report's FPR (5 % unless stated)
    evasion_rate: float     # attacked inputs fooled *and* accepted (attack success after detection)
    robust_acc: float       # benchmark's rule, this attack alone
    robust_mask: torch.Tensor = dataclasses.field(repr=False, default=None)  # per input


@dataclasses.dataclass
class DetectorReport:
    n: int
    classifier_acc: float   # the guarded classifier alone, no rejection
    ospa: float
    fpr: float              # clean inputs rejected
    fpr_target: float       # the FPR at which ``tpr_at_fpr`` is read
    attacks: dict[str, AttackDetection]

    def worst_case_robust_acc(self, attacks: Sequence[str] | None = None) -> float:
        """Robust accuracy when every attack (of ``attacks``, default all) is tried per input."""
        names = list(self.attacks) if attacks is None else list(attacks)
        mask = torch.stack([self.attacks[a].robust_mask for a in names]).all(0)
        return mask.float().mean().item()

    def as_metrics(self) -> dict[str, float]:
        """Flat numeric metrics for a trial record (``det.<attack>.<metric>``)."""
        out = {"ospa": self.ospa, "clean_fpr": self.fpr, "classifier_acc": self.classifier_acc}
        for name, a in self.attacks.items():
            out.update({f"det.{name}.detection_rate": a.detection_rate,
                        f"det.{name}.auroc": a.auroc, f"det.{name}.tpr_at_fpr": a.tpr_at_fpr,
                        f"det.{name}.evasion_rate": a.evasion_rate})
        return out


def _decide(detector: ScoredDetector, x: torch.Tensor, batch_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    preds, rejected, scores = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            logits, rej, score = detector.decide(xb)
            preds.append(logits.argmax(1))
            rejected.append(rej)
            scores.append(score)
    return torch.cat(preds), torch.cat(rejected), torch.cat(scores)


def craft(attacks: Sequence[Attack], x: torch.Tensor, y: torch.Tensor,
          batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Adversarial versions of every input, per attack (``attack.name`` -> tensor like x).
    Built once so that several detector settings can be scored on the same examples."""
    out = {}
    for attack in attacks:
        out[attack.name] = torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size])
                                      for i in range(0, len(x), batch_size)])
    return out


def detection_report(detector: ScoredDetector, x: torch.Tensor, y: torch.Tensor,
                     adversarials: Mapping[str, torch.Tensor], batch_size: int = 256,
                     fpr: float = 0.05) -> DetectorReport:
    """Detector metrics on clean (x, y) and on ``adversarials`` (same order as x; e.g. from
    ``craft``). Only inputs the classifier gets right count as attacked."""
    with frozen_eval(detector.model):
        pred, rejected, clean_scores = _decide(detector, x, batch_size)
        accepted_correct = (pred == y) & ~rejected
        correct = pred == y
        report = {}
        for name, adv in adversarials.items():
            adv_pred, adv_rej, adv_scores = _decide(detector, adv, batch_size)
            fooled = correct & (adv_pred != y)
            evaded = fooled & ~adv_rej
            robust = accepted_correct & ((adv_pred == y) | adv_rej)
            report[name] = AttackDetection(
                attack=name, attacked=int(correct.sum()), fooled=int(fooled.sum()),
                detection_rate=detection_rate(adv_rej, fooled),
                auroc=roc_auc(clean_scores, adv_scores[fooled]),
                tpr_at_fpr=tpr_at_fpr(clean_scores, adv_scores[fooled], fpr),
                evasion_rate=evaded.float().sum().item() / max(int(correct.sum()), 1),
                robust_acc=robust.float().mean().item(), robust_mask=robust.cpu())
    return DetectorReport(n=len(y), classifier_acc=correct.float().mean().item(),
                          ospa=ospa(pred, y, rejected), fpr=rejected.float().mean().item(),
                          fpr_target=fpr, attacks=report)


def detector_metrics(detector: ScoredDetector, x: torch.Tensor, y: torch.Tensor,
                     attacks: Sequence[Attack], batch_size: int = 256,
                     fpr: float | None = None) -> dict[str, float]:
    """A detector's columns for a trial record, on clean test images (x, y) and the attacks of
    the evaluation cascade: ``fpr`` (clean inputs rejected, the realized FPR), ``ospa``, and
    per attack ``detection.<name>`` (successful adversarials rejected), ``n_fooled.<name>``
    (successful adversarials: misclassified by the classifier, before any rejection),
    ``auroc.<name>`` and ``tpr_at_fpr.<name>`` (TPR at ``fpr``, default the detector's target
    FPR). Each attack runs once, on the inputs the classifier gets right (the only ones whose
    adversarial versions count), not as a cascade: detection is a property of each attack."""
    if not isinstance(detector, ScoredDetector):
        raise TypeError(f"{type(detector).__name__} is not a detector (no decide/detector_score)")
    if fpr is None:
        fpr = getattr(detector, "target_fpr", 0.05)
    with frozen_eval(detector.model):
        pred, rejected, clean_scores = _decide(detector, x, batch_size)
        out = {"fpr": rejected.float().mean().item(), "ospa": ospa(pred, y, rejected)}
        correct = (pred == y).nonzero().squeeze(1)
        xc, yc = x[correct], y[correct]
        for attack in attacks:
            if len(yc) == 0:  # nothing to attack: every rate is undefined, nothing was fooled
                out.update({f"detection.{attack.name}": math.nan, f"n_fooled.{attack.name}": 0.0,
                            f"auroc.{attack.name}": math.nan, f"tpr_at_fpr.{attack.name}": math.nan})
                continue
            adv = craft([attack], xc, yc, batch_size)[attack.name]
            adv_pred, adv_rej, adv_scores = _decide(detector, adv, batch_size)
            fooled = adv_pred != yc
            out.update({f"detection.{attack.name}": detection_rate(adv_rej, fooled),
                        f"n_fooled.{attack.name}": float(fooled.sum()),
                        f"auroc.{attack.name}": roc_auc(clean_scores, adv_scores[fooled]),
                        f"tpr_at_fpr.{attack.name}": tpr_at_fpr(clean_scores, adv_scores[fooled], fpr)})
    return out
