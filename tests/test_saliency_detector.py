"""The model-based saliency detectors (paper 001): bad input, the masking model's training, the
threshold's FPR on held-out clean data, detector checkpoints, and the white-box attack."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from defenses import data as data_lib
from defenses import models, registry
from defenses.attacks import pgd
from defenses.base import DefenseConfigError, ThreatModel
from defenses.saliency_detector import (AlternatingWhiteBox, DetectorCNN, SaliencyDetector,
                                        deepfool, detection_attack, detector_input,
                                        input_channels)
from defenses.saliency_masking import (MaskingModel, SaliencyLossWeights, evaluate_masking_model,
                                       train_masking_model)

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the machine is shared: one thread each is faster than oversubscribed cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _dataset(mnist, n):
    return dataclasses.replace(mnist, train_x=mnist.train_x[:n], train_y=mnist.train_y[:n])


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

    for kind in SPACE["detector"].categories:
        SaliencyDetector.make_params({"detector": kind, "train_attack": SPACE["train_attack"],
                                      "fpr": SPACE["fpr"], "detector_lr": 1e-3})


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
    """The image-only detector trained on FGSM, its threshold set on 1000 clean images."""
    class Wide(SaliencyDetector):
        calibration_size = 1000

    defense = Wide(models.build("small_cnn", 10, 1), SaliencyDetector.make_params(
        {"detector": "id", "train_attack": "fgsm", "passes": 3}), THREAT)
    defense.setup(_dataset(mnist, 2000), base)
    for epoch in (1, 2):
        defense.train_epoch([], None, epoch)
        defense.end_epoch(epoch, None)
    return defense


def test_threshold_gives_the_stated_fpr_on_held_out_clean_data(id_detector, mnist):
    x = mnist.test_x  # 1000 clean images neither the detector nor its threshold saw
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
