"""Grad-CAM inconsistency detector (Ye et al.): θ, enhancements, calibration, setup and a real trial."""

import pytest
import torch

from defenses import attacks
from defenses.core import models
from defenses.core.base import DefenseConfigError, ThreatModel
from defenses.core.data import Dataset
from defenses.evaluation.detection import craft, detection_report
from defenses.gradcam_detector import (GradCAMDetector, color_reverse, emphasis_image,
                                       normalized_cam, zero_mean)

EPS = 0.3


def detector(model, **hp):
    return GradCAMDetector(model, GradCAMDetector.make_params(hp), ThreatModel(EPS))


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.test_x[:128], mnist.test_y[:128]


def test_theta_zero_never_rejects_clean_or_adversarial(trained_cnn, batch):
    x, y = batch
    d = detector(trained_cnn, theta=0.0, rule="paper")
    adv = attacks.make("fgsm", trained_cnn, EPS)(x, y)
    for inputs in (x, adv, torch.rand_like(x)):
        with torch.no_grad():
            assert not d.predict(inputs).rejected.any()


def test_emphasis_rejects_some_and_its_score_agrees_with_the_rule(trained_cnn, batch):
    x, y = batch
    d = detector(trained_cnn, theta=0.5, rule="paper")
    adv = attacks.make("fgsm", trained_cnn, EPS)(x, y)
    with torch.no_grad():
        rejected = d.predict(adv).rejected
    assert rejected.any() and not rejected.all()
    # the paper's rule written out: f labels the emphasis image differently from x
    label = trained_cnn(adv).argmax(1)
    emphasis = emphasis_image(adv, normalized_cam(trained_cnn, adv, label), 0.5)
    with torch.no_grad():
        assert torch.equal(rejected, trained_cnn(emphasis).argmax(1) != label)
        assert torch.equal(d.detector_score(adv) > 0, rejected)


def test_detector_separates_fgsm_from_clean(trained_cnn, batch):
    x, y = batch
    d = detector(trained_cnn, theta=0.3, rule="paper")
    report = detection_report(d, x, y, craft([attacks.make("fgsm", trained_cnn, EPS)], x, y))
    fgsm = report.attacks["fgsm"]
    assert fgsm.fooled > 30
    assert fgsm.auroc > 0.6, report
    assert fgsm.detection_rate > report.fpr, report
    assert report.ospa == pytest.approx(report.classifier_acc - _rejected_correct(d, x, y) / len(y))


def _rejected_correct(d, x, y):
    with torch.no_grad():
        logits, rejected = d.predict(x)
    return int(((logits.argmax(1) == y) & rejected).sum())


def test_cam_is_normalized_upsampled_and_the_emphasis_image_stays_an_image(trained_cnn, batch):
    x, _ = batch
    cam = normalized_cam(trained_cnn, x[:8])
    assert cam.shape == (8, 1, 28, 28)
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
    peaks = cam.amax((2, 3)).flatten()
    assert peaks.gt(0).any() and torch.allclose(peaks[peaks > 0], torch.ones(1))
    e = emphasis_image(x[:8], cam, 0.5)
    assert float(e.min()) >= 0 and float(e.max()) <= 1
    assert (e >= x[:8]).all()


def test_enhancements():
    rgb = torch.rand(2, 3, 4, 4)
    assert torch.equal(color_reverse(rgb)[:, 0], rgb[:, 2]) and torch.equal(color_reverse(rgb)[:, 2], rgb[:, 0])
    assert zero_mean(rgb).mean((2, 3)).abs().max() < 1e-6


def test_the_surrogate_is_differentiable_through_the_cam(trained_cnn, batch):
    x, y = batch
    d = detector(trained_cnn, theta=0.5, rule="paper")
    joint = d.joint()
    xs = x[:16].clone().requires_grad_(True)
    logits, score = joint(xs)
    grad, = torch.autograd.grad(score.sum(), xs)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the same score with the CAM held constant has a different gradient: the second-order
    # path through Grad-CAM is really there
    label = logits.argmax(1).detach()
    xs2 = x[:16].clone().requires_grad_(True)
    cam = normalized_cam(trained_cnn, xs2.detach(), label)
    margin = d.model(emphasis_image(xs2, cam, 0.5))
    from defenses.gradcam_detector import logit_margin
    grad_const, = torch.autograd.grad(logit_margin(margin, label).sum(), xs2)
    assert not torch.allclose(grad, grad_const)


@pytest.mark.parametrize("hp, match", [({"theta": -0.1}, "theta=-0.1"),
                                       ({"theta": float("nan")}, "theta"),
                                       ({"enhancement": "sepia"}, "unknown enhancement"),
                                       ({"fpr": 0.0}, "fpr=0.0"), ({"fpr": 1.5}, "fpr=1.5"),
                                       ({"rule": "label"}, "unknown rule 'label'; valid: margin, paper"),
                                       ({"rule": "paper", "fpr": 0.05}, "has no threshold")])
def test_bad_hyperparameters_are_one_clear_line(hp, match):
    with pytest.raises(DefenseConfigError, match=match) as e:
        GradCAMDetector.make_params(hp)
    assert "\n" not in str(e.value)


def test_bad_theta_in_a_sweep_spec_stops_before_ray():
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match="theta"):
        parse({"defenses": {"gradcam_detector": {"space": {"theta": {"low": -0.2, "high": 0.3}}}}})
    parse({"defenses": ["gradcam_detector"]})  # the default space is valid


def _checkpoint(tmp_path, net, **meta):
    base = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
            "in_channels": 1, "seed": 0, "hp": {}}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "meta": {**base, **meta}}, path)
    return path


def test_setup_loads_the_guarded_classifier_and_refuses_a_foreign_one(mnist, trained_cnn, tmp_path):
    fresh = models.build("small_cnn", 10, 1)
    d = detector(fresh, theta=0.2, rule="paper")  # the session's mnist has no validation split
    d.setup(mnist, _checkpoint(tmp_path, trained_cnn))
    x = mnist.test_x[:16]
    with torch.no_grad():
        assert torch.equal(d.predict(x).logits.argmax(1), trained_cnn(x).argmax(1))
    for meta, match in [({"dataset": "cifar10"}, "trained on 'cifar10'"),
                        ({"model": "preact_resnet18"}, "is a 'preact_resnet18'")]:
        with pytest.raises(DefenseConfigError, match=match):
            detector(models.build("small_cnn", 10, 1), rule="paper").setup(
                mnist, _checkpoint(tmp_path, trained_cnn, **meta))
    with pytest.raises(DefenseConfigError, match="needs the checkpoint"):
        detector(models.build("small_cnn", 10, 1)).setup(mnist, None)


def test_colour_reversing_is_refused_on_one_channel_data(mnist, trained_cnn, tmp_path):
    d = detector(models.build("small_cnn", 10, 1), enhancement="color_reverse")
    with pytest.raises(DefenseConfigError, match="needs 3-channel images") as e:
        d.setup(mnist, _checkpoint(tmp_path, trained_cnn))
    assert "\n" not in str(e.value)


def test_colour_reversing_runs_on_three_channel_data(tmp_path):
    torch.manual_seed(0)
    rgb_model = models.build("small_cnn", 10, 3).eval()
    x = torch.rand(4, 3, 32, 32)
    labels = torch.zeros(4, dtype=torch.long)
    rgb = Dataset("cifar10", x, labels, x, labels, 10, val_x=torch.rand(40, 3, 32, 32),
                  val_y=torch.zeros(40, dtype=torch.long))
    path = _checkpoint(tmp_path, rgb_model, dataset="cifar10", in_channels=3)
    d = detector(models.build("small_cnn", 10, 3), theta=0.2, enhancement="color_reverse")
    d.setup(rgb, path)
    d.train_epoch(iter(()), None, 1)
    with torch.no_grad():
        assert d.predict(x).rejected.shape == (4,)
    # θ = 0 with colour reversing is colour reversing alone: it compares f(x) with f(BGR(x))
    d0 = detector(rgb_model, theta=0.0, enhancement="color_reverse", rule="paper")
    with torch.no_grad():
        expected = rgb_model(x.flip(1)).argmax(1) != rgb_model(x).argmax(1)
        assert torch.equal(d0.predict(x).rejected, expected)


def test_training_learns_nothing_and_stops(trained_cnn, batch):
    d = detector(trained_cnn, theta=0.2, rule="paper")
    before = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    assert d.train_epoch(iter([batch]), torch.optim.SGD(trained_cnn.parameters(), 1.0), 1) == {}
    assert d.stop_training
    assert all(torch.equal(before[k], v) for k, v in trained_cnn.state_dict().items())
    metrics = d.end_epoch(1, (batch[0][:64], batch[1][:64]))
    assert {"holdout.ospa", "holdout.clean_fpr", "holdout.det.fgsm.auroc"} <= set(metrics)


def test_a_real_trial_runs_with_the_adaptive_attacks(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trial import run_trial

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 600,
                  "eval_samples": 40, "batch_size": 100,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2},
                  "defenses": ["gradcam_detector"]})
    rec = run_trial({"defense": "gradcam_detector", "hp": {"theta": 0.4}, "spec": spec,
                     "run_dir": str(tmp_path)})
    assert rec.status == "completed", rec.error
    assert [k for k in rec.acc if not k.startswith("check.")] == [
        "fgsm", "cw_extra-10x2", "opgd-20", "square_joint-100"]
    assert rec.robust_acc <= rec.acc["fgsm"] <= rec.clean_acc
    assert 0.0 <= rec.metrics["clean_rejected"] <= 1.0


def test_a_margin_threshold_calibrated_at_a_stated_fpr(trained_cnn, mnist):
    d = detector(trained_cnn, theta=0.3, fpr=0.1)
    x = mnist.test_x[:300]
    with pytest.raises(RuntimeError, match="threshold"):
        d.predict(x)
    with pytest.raises(RuntimeError, match="no validation images"):
        d.train_epoch(iter(()), None, 1)  # before setup there is no validation split
    metrics = d.calibrate(x)
    assert metrics["threshold"] == d.threshold < 0
    with torch.no_grad():
        rejected = d.predict(x).rejected.float().mean().item()
    assert abs(rejected - 0.1) <= 1 / 150  # on its own calibration set: the quantile's FPR
    paper_rule = detector(trained_cnn, theta=0.3, rule="paper")
    with torch.no_grad():  # the calibrated threshold is stricter than the label comparison
        assert (d.predict(x).rejected | ~paper_rule.predict(x).rejected).all()
    restored = detector(trained_cnn, theta=0.3, fpr=0.1)
    restored.load_state_dict(d.state_dict())
    assert restored.threshold == d.threshold
