"""Detector-aware attacks (extra-class C&W, orthogonal PGD, Square on the joint decision, restarts)
and the shared detector metrics."""
import math

import pytest
import torch
import torch.nn as nn

from defenses.attacks.detector_aware import (ExtraClassCW, JointSquare, OrthogonalPGD,
                                             _remove_component, cw_loss, defended_margin,
                                             extra_class_logits)
from defenses.core.base import ThreatModel
from defenses.core.detector import GuardDetector
from defenses.evaluation.detection import (detection_rate, detection_report, roc_auc, threshold_at_fpr, tpr_at_fpr)
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


def test_orthogonal_pgd_evades_a_detector_that_plain_pgd_trips(trained_cnn, mnist):
    from defenses.attacks import pgd

    # 200 images: on 20, one image is 5 points, and the selective variant's rate moved from
    # above to below the bar between two CPUs (measured on 200: plain 0 %, orthogonal 43.5 %,
    # selective 31 %)
    x, y = mnist.test_x[:200], mnist.test_y[:200]
    torch.manual_seed(0)  # PGD's random start: the same draw whichever tests ran before
    guard = GreyGuard(trained_cnn, x, slack=0.01)
    plain = evaded(guard, pgd(trained_cnn, x, y, EPS, 2.5 * EPS / 20, 20), y)
    for variant in ("orthogonal", "selective"):
        adv = OrthogonalPGD(guard, EPS, steps=20, variant=variant)(x, y)
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        assert evaded(guard, adv, y) > plain + 0.2, (variant, plain, evaded(guard, adv, y))


@pytest.fixture(scope="module")
def gradcam(trained_cnn):
    # the paper's label comparison: no threshold to calibrate, so no validation split needed
    return GradCAMDetector(trained_cnn, GradCAMDetector.make_params({"theta": 0.3, "rule": "paper"}),
                           ThreatModel(EPS))


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


# --- Square on the joint decision, restarts ---------------------------------------------------

def test_defended_margin_is_nonpositive_only_for_accepted_misclassifications():
    logits = torch.tensor([[1.0, 3.0, 0.0], [1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 0])
    score = torch.tensor([-0.5, 0.5, -0.5, 0.5])  # accepted, rejected, accepted, rejected
    m = defended_margin(logits, score, y)
    assert (m <= 0).tolist() == [True, False, False, False]
    assert m.tolist() == [-0.5, 0.5, 2.0, 2.0]


def _brightness_classifier():
    """Linear on a 4×4 image: class 1 when 2·L + R > 1.7 (L, R: mean of the left / right two
    columns); its input gradient brightens both halves, the left one twice as much."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    w = torch.zeros(2, 1, 4, 4)
    w[1, :, :, :2], w[1, :, :, 2:] = 0.25, 0.125
    with torch.no_grad():
        net[1].weight.copy_(w.flatten(1))
        net[1].bias.copy_(torch.tensor([0.0, -1.7]))
    return net.eval()


class BrightnessGuard(GuardDetector):
    """Rejects images brighter than 0.55 on average, the mean read through a rounding step:
    the score's input gradient is exactly zero everywhere."""

    name = "brightness_test"

    def score(self, x, logits):
        return torch.round(x.mean((1, 2, 3)), decimals=2) - 0.55


def test_square_on_the_joint_decision_evades_a_rounded_detector_gradient_attacks_cannot():
    # Clean images (mean 0.5) are class 0 and accepted. Following the classifier's gradient
    # brightens both halves, so the first misclassified point is too bright, and the
    # detector's gradient (zero) never says to darken the right half; misclassified and
    # accepted needs L up and R down (the vertex L = 0.8, R = 0.2 of the ε-ball), which
    # random search finds.
    det = BrightnessGuard(_brightness_classifier(), None, ThreatModel(EPS))
    x = 0.48 + 0.04 * torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(32, dtype=torch.long)
    assert not det.predict(x).rejected.any() and (det.predict(x).logits.argmax(1) == y).all()
    xi = x.clone().requires_grad_(True)
    _, score = det.joint()(xi)
    grad, = torch.autograd.grad(score.sum(), xi, allow_unused=True)
    assert grad is None or not grad.any()
    attacks = det.adaptive_attacks(EPS)
    assert [a.name for a in attacks] == ["cw_extra-10x2", "opgd-20", "square_joint-100"]
    assert isinstance(attacks[-1], JointSquare)
    rates = {}
    for attack in attacks:
        torch.manual_seed(0)
        adv = attack(x, y)
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        with torch.no_grad():
            pred = det.predict(adv)
        rates[attack.name] = ((pred.logits.argmax(1) != y) & ~pred.rejected).float().mean().item()
    assert rates["square_joint-100"] > 0.4, rates
    assert max(rates["cw_extra-10x2"], rates["opgd-20"]) < 0.15, rates


class DeadStart(nn.Module):
    """z₁ = 10·relu(mean(x) − 0.55) against a constant z₀ = 0.5, and a detector that accepts
    everything: at the clean images (mean 0.52) the ReLU is off, so every input gradient is
    zero there and only a start elsewhere in the ball gives an attack a direction."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z1 = 10 * torch.relu(x.mean((1, 2, 3)) - 0.55) + self.anchor
        return torch.stack([torch.full_like(z1, 0.5), z1], 1), 0 * x.mean((1, 2, 3)) - 1


@pytest.mark.parametrize("make", [
    lambda j, r: OrthogonalPGD(j, EPS, steps=10, early_stop=True, restarts=r),
    lambda j, r: ExtraClassCW(j, EPS, steps=10, search_steps=2, early_stop=True, restarts=r)])
def test_random_restarts_reach_what_the_clean_start_cannot(make):
    joint = DeadStart()
    x, y = torch.full((32, 1, 4, 4), 0.52), torch.zeros(32, dtype=torch.long)
    rates = []
    for restarts in (1, 3):
        torch.manual_seed(0)
        adv = make(joint, restarts)(x, y)
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        rates.append(evaded(joint, adv, y))
    assert rates[0] == 0.0 and rates[1] > 0.2, rates


def test_square_and_restarts_reject_bad_settings(gradcam):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="restarts"):
            OrthogonalPGD(gradcam.joint(), EPS, restarts=bad)
    with pytest.raises(ValueError, match="restarts"):
        ExtraClassCW(gradcam.joint(), EPS, restarts=0)
    with pytest.raises(ValueError, match="queries"):
        JointSquare(gradcam.joint(), EPS, queries=0)
    with pytest.raises(ValueError, match="p_init"):
        JointSquare(gradcam.joint(), EPS, p_init=0.0)


def test_the_full_adaptive_set_runs_at_the_threat_models_eps_the_curve_gets_single_runs():
    det = BrightnessGuard(_brightness_classifier(), None, ThreatModel(EPS, attacks=("fgsm", "pgd-40")))
    full, curve = det.adaptive_attacks(EPS), det.adaptive_attacks(0.1)
    assert [a.name for a in full] == ["cw_extra-20x2", "opgd-40", "square_joint-200"]
    assert [a.restarts for a in full] == [2, 2, 1]
    assert [a.name for a in curve] == ["cw_extra-20x2", "opgd-40"]
    assert [a.restarts for a in curve] == [1, 1] and all(a.eps == 0.1 for a in curve)
