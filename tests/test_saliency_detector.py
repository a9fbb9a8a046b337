"""The model-based saliency detectors (paper 001): bad input, the masking model's training, the
threshold's FPR on held-out clean data, detector checkpoints, and the white-box attack."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from defenses.core import data as data_lib
from defenses.core import models, registry
from defenses.attacks import pgd
from defenses.attacks.detector_aware import OrthogonalPGD
from defenses.core.base import DefenseConfigError, ThreatModel
from defenses.saliency_detector import AlternatingWhiteBox, SaliencyDetector
from defenses.saliency.detector_net import DetectorCNN, detector_input, input_channels
from defenses.attacks.detector_training import deepfool, detection_attack
from defenses.saliency.masking import (MaskingModel, SaliencyLossWeights, evaluate_masking_model, train_masking_model)

EPS = 0.3
THREAT = ThreatModel(eps=EPS)


def _classifier(x, y, seed):
    torch.manual_seed(seed)
    model = models.build("small_cnn", 10, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for xb, yb in data_lib.batches(x, y, 50, shuffle=True, generator=gen):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model.eval()


def _checkpoint(model, path):
    meta = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
            "in_channels": 1, "seed": 0, "hp": {}}
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    return data_lib.load("mnist5k")


@pytest.fixture(scope="module")
def classifier(mnist):
    """small_cnn after one epoch on 1200 mnist5k images."""
    return _classifier(mnist.train_x[:1200], mnist.train_y[:1200], seed=0)


@pytest.fixture(scope="module")
def base(classifier, tmp_path_factory):
    return _checkpoint(classifier, tmp_path_factory.mktemp("base") / "checkpoint.pt")


def _dataset(mnist, n, n_val=256):
    # as in a trial: the validation split is the last of the training images, never trained on
    return dataclasses.replace(mnist, train_x=mnist.train_x[:n], train_y=mnist.train_y[:n],
                               val_x=mnist.train_x[-n_val:], val_y=mnist.train_y[-n_val:])


def _defense(hp):
    cls = registry.get("saliency_detector")
    model = models.build("small_cnn", 10, 1)
    return cls(model, cls.make_params(hp), THREAT)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("hp, message", [
    ({"fpr": 0.0}, "fpr=0.0 must lie strictly between 0 and 1"),
    ({"fpr": 1.0}, "fpr=1.0 must lie strictly between 0 and 1"),
    ({"fpr": -0.1}, "strictly between 0 and 1"),
    ({"train_attack": "pgd"}, "unknown train_attack 'pgd'; valid: fgsm, bim, mim, cw, deepfool"),
    ({"train_attack": "jsma"}, "test-only"),
    ({"detector": "lid"}, "unknown detector 'lid'; valid: smd, spd, id, jsd"),
    ({"area_weight": -1.0}, "area=-1.0 must be a finite number ≥ 0"),
    ({"preserve_weight": 0.0, "destroy_weight": 0.0}, "both 0"),
    ({"rounds": 0}, "rounds=0 must be an integer ≥ 1"),
    ({"detector_checkpoint": "/nonexistent/det.pt"}, "does not exist"),
    ({"no_such": 1}, "has no hyperparameter"),
])
def test_bad_hyperparameters_are_one_line_config_errors(hp, message):
    with pytest.raises(DefenseConfigError) as err:
        SaliencyDetector.make_params(hp)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_default_search_space_values_are_valid():
    from search_spaces.saliency_detector import SPACE

    for kind in SPACE["detector"]:
        SaliencyDetector.make_params({"detector": kind, "train_attack": SPACE["train_attack"],
                                      "detector_lr": 1e-3})
    assert "fpr" not in SPACE  # the threshold's FPR is the spec's threat_model.fpr


# --- the masking model ------------------------------------------------------------------------

def test_masking_model_loss_decreases_on_real_data(classifier, mnist):
    w = SaliencyLossWeights()
    x, y = mnist.train_x[2000:2300], mnist.train_y[2000:2300]
    xt, yt = mnist.test_x[:100], mnist.test_y[:100]
    torch.manual_seed(0)
    encoder = {k: v.clone() for k, v in classifier.state_dict().items()}
    masker = MaskingModel(classifier, 10, (1, 28, 28))
    before = evaluate_masking_model(masker, xt, yt, w)
    history = train_masking_model(masker, x, y, w, epochs=3, batch_size=50, lr=5e-3)
    after = evaluate_masking_model(masker, xt, yt, w)
    assert history[-1] < history[0]
    assert after["loss"] < before["loss"] - 0.2  # on held-out images, not only the trained ones
    assert all(torch.equal(v, encoder[k]) for k, v in classifier.state_dict().items())  # frozen


@pytest.mark.parametrize("kind", ["smd", "spd", "jsd"])
def test_detector_score_is_differentiable_in_the_input(classifier, mnist, kind):
    """The white-box attacks differentiate the detector through the masking model (and the
    logit gradient for JSD) down to the image."""
    masker = MaskingModel(classifier, 10, (1, 28, 28)).requires_grad_(False)
    net = DetectorCNN(input_channels(kind, 1), 28, 28).requires_grad_(False)
    x = mnist.test_x[:8].clone().requires_grad_(True)
    logits = classifier(x)
    score = net(detector_input(kind, classifier, masker, x, logits))
    grad, = torch.autograd.grad(score.sum(), x)
    assert score.shape == (8,) and grad.abs().sum() > 0


def test_one_forward_score_equals_the_two_forward_score(classifier, mnist):
    """predict / the attacks' joint reuse the classification's features for the mask: the same
    score as running the masking model's encoder again."""
    defense = _defense({"detector": "spd"})
    defense.model = classifier
    defense.masker = MaskingModel(classifier, 10, (1, 28, 28)).requires_grad_(False)
    defense.net = DetectorCNN(1, 28, 28).requires_grad_(False)
    defense.threshold = 0.0
    x = mnist.test_x[:16]
    with torch.no_grad():
        logits, score = defense.joint()(x)
        assert torch.allclose(score, defense.score(x, classifier(x)), atol=1e-5)
        assert torch.equal(defense.predict(x).rejected, score > 0)
    names = [a.name for a in defense.paper_attacks(EPS)]
    assert names == ["fgsm", "bim-10", "mim-10", "cw_l2-30", "deepfool_l2-50", "alt_whitebox-5"]


# --- threshold, detection, white-box attack ---------------------------------------------------

@pytest.fixture(scope="module")
def id_detector(mnist, base):
    """The image-only detector trained on FGSM (2000 images), its threshold set on a
    validation split of 1000 clean images neither it nor the classifier trained on."""
    defense = SaliencyDetector(models.build("small_cnn", 10, 1), SaliencyDetector.make_params(
        {"detector": "id", "train_attack": "fgsm", "passes": 3}), THREAT)
    defense.setup(_dataset(mnist, 2000, n_val=1000), base)
    assert len(defense.train_y) == 2000 and len(defense.calib_x) == 1000
    for epoch in (1, 2):
        defense.train_epoch([], None, epoch)
        defense.end_epoch(epoch, None)
    return defense


def test_threshold_gives_the_stated_fpr_on_held_out_clean_data(id_detector, mnist):
    x = mnist.test_x  # 1000 clean images neither the detector nor its threshold saw
    assert id_detector.target_fpr == THREAT.fpr == 0.05  # fpr None: the threat model's
    with torch.no_grad():
        rejected = id_detector.predict(x).rejected
    assert abs(rejected.float().mean().item() - 0.05) <= 0.02


def test_detector_detects_its_training_attack(id_detector, mnist):
    x, y = mnist.test_x[:200], mnist.test_y[:200]
    model = id_detector.model
    adv = detection_attack("fgsm", model, EPS)(x, y)
    with torch.no_grad():
        fooled = (model(x).argmax(1) == y) & (model(adv).argmax(1) != y)
        rejected = id_detector.predict(adv).rejected
    assert fooled.sum() > 50
    assert rejected[fooled].float().mean() > 0.8


def test_alternating_whitebox_evades_the_detector_more_than_a_classifier_attack(id_detector, mnist):
    x, y = mnist.test_x[:100], mnist.test_y[:100]
    model = id_detector.model

    def evasion(adv):
        with torch.no_grad():
            logits, rejected = id_detector.predict(adv)
        return ((logits.argmax(1) != y) & ~rejected).float().mean().item()

    attack = AlternatingWhiteBox(id_detector.joint(), EPS, rounds=5)
    white = attack(x, y)
    blind = pgd(model, x, y, EPS, alpha=2.5 * EPS / 10, steps=10)
    assert float((white - x).abs().max()) <= EPS + 1e-6 and white.min() >= 0 and white.max() <= 1
    assert evasion(white) > evasion(blind) + 0.2
    assert any(isinstance(a, AlternatingWhiteBox) for a in id_detector.adaptive_attacks(EPS))


def test_deepfool_fools_the_classifier(classifier, mnist):
    x, y = mnist.test_x[:10], mnist.test_y[:10]
    adv = deepfool(classifier, x, y, steps=50)
    with torch.no_grad():
        correct = classifier(x).argmax(1) == y
        fooled = classifier(adv).argmax(1) != y
    assert fooled[correct].float().mean() > 0.9 and adv.min() >= 0 and adv.max() <= 1


# --- detector checkpoints ---------------------------------------------------------------------

def test_detector_checkpoint_for_another_classifier_is_a_config_error(mnist, base, tmp_path):
    data = _dataset(mnist, 400)
    first = _defense({"detector": "id"})
    first.setup(data, base)
    first.calibrate()
    saved = tmp_path / "det.pt"
    first.save_detector(saved)

    same = _defense({"detector": "id", "detector_checkpoint": str(saved)})
    same.setup(data, base)
    assert same.threshold == pytest.approx(first.threshold)
    same.train_epoch([], None, 1)
    assert same.stop_training

    other = _checkpoint(models.build("small_cnn", 10, 1).eval(), tmp_path / "other.pt")
    stranger = _defense({"detector": "id", "detector_checkpoint": str(saved)})
    with pytest.raises(DefenseConfigError) as err:
        stranger.setup(data, other)
    assert "was trained for classifier" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DefenseConfigError, match="holds a 'id' detector, not 'spd'"):
        SaliencyDetector.make_params({"detector": "spd", "detector_checkpoint": str(saved)})

    # in a sweep, a detector saved for another dataset/architecture stops the spec before Ray
    from orchestrator.spec import SpecError, parse

    space = {"detector": ["id"], "detector_checkpoint": [str(saved)]}
    parse({"dataset": "mnist5k", "model": "small_cnn", "defenses": {"saliency_detector": {"space": space}}})
    with pytest.raises(SpecError, match=r"trained for classifier small_cnn/mnist5k, not this "
                                        r"sweep's preact_resnet18/mnist5k") as err:
        parse({"dataset": "mnist5k", "model": "preact_resnet18",
               "defenses": {"saliency_detector": {"space": space}}})
    assert "\n" not in str(err.value)


# --- the registered defense in a real trial ----------------------------------------------------

@pytest.mark.slow  # the registry-wide trial test runs this defense in the default run
def test_trial_runs_and_reports_detector_metrics(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trial import run_trial

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 800,
                  "eval_samples": 60, "batch_size": 100,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 3},
                  "defenses": ["saliency_detector"]})
    rec = run_trial({"defense": "saliency_detector", "hp": {"detector": "smd", "mask_epochs": 1},
                     "spec": spec, "run_dir": str(tmp_path)})
    assert rec.status == "completed", rec.error
    assert "alt_whitebox-5" in rec.acc and 0.0 <= rec.robust_acc <= rec.clean_acc
    assert any(p.name.startswith("saliency_mask-") for p in (tmp_path / "bases").rglob("*.pt"))


# --- the jsd detector's Jacobian channel: BPDA with a softplus surrogate -----------------------

class TwoPixelNet(torch.nn.Module):
    """z₀ = 0.5, z₁ = 2·relu(x₁ − 0.1) + relu(x₂ − 0.1) on a 1×1×2 image: ∇ₓz₁ = (2·[x₁ > 0.1],
    [x₂ > 0.1]) is piecewise constant, its derivative zero wherever it exists."""

    attention_layer = "hidden"

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2), torch.nn.ReLU())
        self.out = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.hidden[1].weight.copy_(torch.eye(2))
            self.hidden[1].bias.fill_(-0.1)
            self.out.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 1.0]]))
            self.out.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.out(self.hidden(x))


class ReadsFirstJacobianPixel(torch.nn.Module):
    """A jsd detector network whose decision is the Jacobian channel's first pixel (the image
    channel enters with weight 0, so it is in the graph but moves nothing)."""

    def forward(self, inputs):
        return inputs[:, 1, 0, 0] + 0.0 * inputs[:, 0].flatten(1).sum(1)


def test_jacobian_bpda_evades_a_jsd_decision_the_true_gradient_cannot_reach():
    # Clean images (≈ (0.25, 0.15)) are class 0, whose logit gradient is 0: accepted. The
    # misclassifications the classifier's gradient leads to keep unit 1 on, so the Jacobian
    # pixel reads 2 > 0.5: rejected. Accepted needs x₁ ≤ 0.1 with x₂ > 0.6, and only the
    # derivative of the Jacobian channel says to lower x₁.
    eps = 0.5
    defense = SaliencyDetector(TwoPixelNet().eval(), SaliencyDetector.make_params({"detector": "jsd"}),
                               ThreatModel(eps=eps))
    defense.net, defense.threshold = ReadsFirstJacobianPixel(), 0.5
    x = torch.tensor([0.25, 0.15]).view(1, 1, 1, 2) + 0.03 * torch.rand(
        16, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)

    def evaded(adv):
        with torch.no_grad():
            logits, rejected = defense.predict(adv)
        return ((logits.argmax(1) != y) & ~rejected).float().mean().item()

    assert evaded(x) == 0.0 and not defense.predict(x).rejected.any()
    xi = x.clone().requires_grad_(True)
    _, score = defense.joint()(xi)
    true_grad, = torch.autograd.grad(score.sum(), xi)
    assert not true_grad.any()  # the old attacks' gradient of the decision: exactly zero
    names = [a.name for a in defense.adaptive_attacks(eps)]
    assert names == ["alt_whitebox-5", "cw_extra-10x2", "opgd-20", "bpda_softplus-opgd-20",
                     "square_joint-100"]
    # at a robustness-curve ε (not the threat model's) the gradient attacks run once, alone
    assert [a.name for a in defense.adaptive_attacks(0.2)] == ["alt_whitebox-5", "cw_extra-10x2",
                                                                 "opgd-20"]
    # one run each from the clean images: the surrogate gradient is the only difference
    old = OrthogonalPGD(defense.joint(), eps, steps=20, early_stop=True)
    new = defense.jacobian_bpda_attack(eps)
    new.restarts = 1
    torch.manual_seed(0)
    assert evaded(old(x, y)) == 0.0
    torch.manual_seed(0)
    adv = new(x, y)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert evaded(adv) > 0.5


def test_jacobian_surrogate_keeps_the_decision_and_differentiates_the_channel(classifier, mnist):
    """On the real small_cnn: the BPDA joint's forward values are the detector's, bit for bit;
    through a detector that reads only the Jacobian channel, the true input gradient is exactly
    zero (a ReLU network's logit gradient is piecewise constant) and the surrogate's is not."""
    from defenses.saliency_detector import _SmoothJacobianJoint

    defense = _defense({"detector": "jsd"})
    defense.model = classifier
    torch.manual_seed(0)
    defense.net = DetectorCNN(2, 28, 28).requires_grad_(False)
    with torch.no_grad():
        defense.net.features[0].weight[:, 0] = 0.0  # the image channel: no effect
    defense.threshold = 0.0
    x = mnist.test_x[:8]
    surrogate = _SmoothJacobianJoint(defense)
    xi = x.clone().requires_grad_(True)
    logits, score = surrogate(xi)
    ref_logits, ref_score = defense.joint()(x.clone().requires_grad_(True))
    assert torch.equal(logits, ref_logits) and torch.equal(score, ref_score)
    grad, = torch.autograd.grad(score.sum(), xi)
    xj = x.clone().requires_grad_(True)
    true_grad, = torch.autograd.grad(defense.joint()(xj)[1].sum(), xj)
    assert not true_grad.any() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="jsd"):
        _defense({"detector": "spd"}).jacobian_bpda_attack(EPS)
    assert "bpda_softplus-opgd-20" not in [a.name for a in _defense({"detector": "id"}).adaptive_attacks(EPS)]
