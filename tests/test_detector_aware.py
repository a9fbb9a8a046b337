"""Detector-aware attacks (extra-class C&W, orthogonal PGD) and the shared detector metrics."""
import math

import pytest
import torch
import torch.nn as nn

from defenses.attacks.detector_aware import (ExtraClassCW, OrthogonalPGD, _remove_component,
                                             cw_loss, extra_class_logits)
from defenses.base import ThreatModel
from defenses.detection import (detection_rate, detection_report, roc_auc, threshold_at_fpr,
                                tpr_at_fpr)
from defenses.gradcam_detector import GradCAMDetector

EPS = 0.3


# --- metrics ---------------------------------------------------------------------------------

def test_roc_auc_extremes_ties_and_a_hand_computed_case():
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert roc_auc(torch.ones(5), torch.ones(7)) == 0.5
    # pairs (clean, adv): 0<1 win, 0<2 win, 3>1 loss, 3>2 loss, ties none -> 2/4
    assert roc_auc(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 2.0])) == 0.5
    # a tie counts half: clean {1}, adv {1, 2} -> (0.5 + 1) / 2
    assert roc_auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == 0.75
    assert math.isnan(roc_auc(torch.tensor([1.0]), torch.tensor([])))


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(300, generator=g).round(decimals=1)  # rounded: many ties
    adv = (torch.randn(200, generator=g) + 0.7).round(decimals=1)
    labels = [0] * 300 + [1] * 200
    expected = metrics.roc_auc_score(labels, torch.cat([clean, adv]).numpy())
    assert roc_auc(clean, adv) == pytest.approx(expected, abs=1e-9)


def test_threshold_and_tpr_at_fpr():
    clean = torch.arange(100, dtype=torch.float)  # 0..99
    tau = threshold_at_fpr(clean, 0.05)
    assert (clean > tau).float().mean().item() == pytest.approx(0.05, abs=0.011)
    assert tpr_at_fpr(clean, torch.tensor([98.5, 50.0, 200.0, -1.0]), 0.05) == 0.5
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            threshold_at_fpr(clean, bad)


def test_detection_rate_counts_only_successful_adversarials():
    rejected = torch.tensor([True, True, False, False])
    fooled = torch.tensor([True, False, True, False])
    assert detection_rate(rejected, fooled) == 0.5
    assert math.isnan(detection_rate(rejected, torch.zeros(4, dtype=torch.bool)))


# --- the attack pieces -----------------------------------------------------------------------

def test_extra_class_wins_exactly_when_the_detector_rejects():
    logits = torch.tensor([[3.0, -1.0, 0.5], [-4.0, -2.0, -3.0], [1.0, 2.0, 0.0]])
    score = torch.tensor([0.2, -0.1, -3.0])
    g = extra_class_logits(logits, score)
    assert g.shape == (3, 4)
    assert g.argmax(1).tolist() == [3, 1, 1]  # negative logits too (C&W's product would fail)


def test_cw_loss_is_negative_only_for_accepted_misclassifications():
    logits = torch.tensor([[1.0, 3.0, 0.0], [1.0, 3.0, 0.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    score = torch.tensor([-0.5, 0.5, -0.5])  # accepted, rejected, accepted
    f = cw_loss(logits, score, y, kappa=10.0)
    assert f[0] < 0 and f[1] > 0 and f[2] > 0
    assert (cw_loss(logits, None, y, kappa=10.0) < 0).tolist() == [True, True, False]


def test_remove_component_leaves_an_orthogonal_gradient():
    g, a = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    r = _remove_component(g, a)
    assert (r * a).flatten(1).sum(1).abs().max() < 1e-5


class GreyGuard(nn.Module):
    """A toy joint model: the real classifier, and a differentiable detector of grey pixels
    (clean MNIST is nearly black and white; L∞ perturbations add grey): it rejects inputs whose
    mean x·(1-x) exceeds every clean input's by ``slack``."""

    def __init__(self, classifier, clean, slack):
        super().__init__()
        self.classifier = classifier
        self.limit = float(self.grey(clean).max()) + slack

    @staticmethod
    def grey(x):
        return (x * (1 - x)).mean((1, 2, 3))

    def forward(self, x):
        return self.classifier(x), self.grey(x) - self.limit


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.test_x[:20], mnist.test_y[:20]


def evaded(joint, adv, y):
    with torch.no_grad():
        logits, score = joint(adv)
    return ((logits.argmax(1) != y) & (score <= 0)).float().mean().item()


def test_orthogonal_pgd_evades_a_detector_that_plain_pgd_trips(trained_cnn, batch):
    from defenses.attacks import pgd

    x, y = batch
    guard = GreyGuard(trained_cnn, x, slack=0.01)
    plain = evaded(guard, pgd(trained_cnn, x, y, EPS, 2.5 * EPS / 20, 20), y)
    for variant in ("orthogonal", "selective"):
        adv = OrthogonalPGD(guard, EPS, steps=20, variant=variant)(x, y)
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        assert evaded(guard, adv, y) > plain + 0.3, (variant, plain, evaded(guard, adv, y))


@pytest.fixture(scope="module")
def gradcam(trained_cnn):
    return GradCAMDetector(trained_cnn, GradCAMDetector.make_params({"theta": 0.3}), ThreatModel(EPS))


def test_extra_class_cw_lowers_the_detection_rate_of_the_gradcam_detector(gradcam, trained_cnn, batch):
    """The issue's check: the detector-aware C&W beats the non-adaptive one on detection."""
    x, y = batch
    model = trained_cnn.train()  # the attacks must freeze it and give the mode back
    adaptive = ExtraClassCW(gradcam.joint(), EPS, steps=10, search_steps=2, early_stop=True)
    plain = ExtraClassCW(model, EPS, steps=10, search_steps=2, extra_class=False)
    adv = {"plain": plain(x, y), "adaptive": adaptive(x, y)}
    assert model.training and all(p.requires_grad for p in model.parameters())
    for a in adv.values():
        assert float((a - x).abs().max()) <= EPS + 1e-6 and 0 <= float(a.min()) <= float(a.max()) <= 1
    model.eval()
    report = detection_report(gradcam, x, y, adv).attacks
    assert report["plain"].fooled >= 8 and report["adaptive"].fooled >= 8
    assert report["adaptive"].detection_rate < report["plain"].detection_rate - 0.2, report
    assert report["adaptive"].evasion_rate > report["plain"].evasion_rate


def test_attacks_reject_bad_settings(gradcam):
    with pytest.raises(ValueError, match="variant"):
        OrthogonalPGD(gradcam.joint(), EPS, variant="sideways")
    with pytest.raises(ValueError):
        ExtraClassCW(gradcam.joint(), EPS, steps=0)
