"""Feature squeezing (Xu et al.): squeezers, the threshold's FPR, configuration errors."""
import dataclasses

import pytest
import torch

from defenses.core import data, models
from defenses.core.base import DefenseConfigError, ThreatModel
from defenses.feature_squeezing import (FeatureSqueezing, bit_depth, median_filter,
                                        non_local_means)

EPS = 0.3


def squeezing(model, **hp):
    return FeatureSqueezing(model, FeatureSqueezing.make_params(hp), ThreatModel(EPS))


def test_bit_depth_levels_and_straight_through_gradient():
    x = torch.linspace(0, 1, 101).view(1, 1, 1, 101)
    assert set(bit_depth(x, 1).unique().tolist()) == {0.0, 1.0}
    assert len(bit_depth(x, 3).unique()) == 8
    xr = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(bit_depth(xr, 2, straight_through=True).sum(), xr)
    assert torch.equal(grad, torch.ones_like(x))
    assert torch.equal(bit_depth(x, 2, straight_through=True), bit_depth(x, 2))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_median_filter_matches_scipy(size):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(size))
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
    assert torch.allclose(median_filter(x, size), torch.from_numpy(expected))


def test_non_local_means_keeps_constants_and_removes_noise():
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(non_local_means(flat, 7, 3, 4.0), flat)
    g = torch.Generator().manual_seed(0)
    clean = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    out = non_local_means(noisy, 11, 3, 20.0)
    assert (out - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()
    xr = noisy.clone().requires_grad_(True)
    grad, = torch.autograd.grad(non_local_means(xr, 5, 3, 20.0).sum(), xr)
    assert torch.isfinite(grad).all()


@pytest.mark.slow  # ~25 s; test_calibration checks the same FPR for every detector, fast
def test_threshold_gives_the_stated_fpr_on_held_out_clean_data(mnist, cnn_first_1000, tmp_path):
    """Calibrated (by setup + the first epoch, as in a trial) on the validation split, clean
    inputs the classifier never saw, checked on other unseen ones. (On the classifier's own
    training images the scores run lower, see docs/detectors.md.)"""
    model = cnn_first_1000
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "meta": {
        "dataset": "mnist5k", "model": "small_cnn", "num_classes": 10, "in_channels": 1}}, path)
    # 4000 images the classifier never saw, split at random: 2000 as the validation split,
    # 2000 to measure on (same distribution; ±2 % is about two standard errors at these sizes)
    pool_x = torch.cat([mnist.train_x[1000:], mnist.test_x])
    pool_y = torch.cat([mnist.train_y[1000:], mnist.test_y])
    order = torch.randperm(len(pool_y), generator=torch.Generator().manual_seed(1))
    split = dataclasses.replace(mnist, train_x=mnist.train_x[:1000], train_y=mnist.train_y[:1000],
                                val_x=pool_x[order[:2000]], val_y=pool_y[order[:2000]])
    held_out = pool_x[order[2000:]]
    for threat_fpr, hp, fpr in ((0.05, {}, 0.05), (0.05, {"fpr": 0.10}, 0.10)):
        d = FeatureSqueezing(models.build("small_cnn", 10, 1), FeatureSqueezing.make_params(
            {"bit_depth": 1, "median_size": 2, **hp}), ThreatModel(EPS, fpr=threat_fpr))
        d.setup(split, path)
        metrics = d.train_epoch(data.batches(mnist.train_x[:1000], mnist.train_y[:1000], 500,
                                             shuffle=False), None, 1)
        assert d.stop_training and metrics["threshold"] == d.threshold and d.target_fpr == fpr
        with torch.no_grad():
            measured = torch.cat([d.predict(held_out[i:i + 500]).rejected
                                  for i in range(0, len(held_out), 500)]).float().mean().item()
        assert abs(measured - fpr) <= 0.02, (fpr, measured)


def test_scores_and_state(trained_cnn, mnist):
    d = squeezing(trained_cnn, bit_depth=1, median_size=2)
    x = mnist.test_x[:16]
    with pytest.raises(RuntimeError, match="threshold"):
        d.predict(x)
    with pytest.raises(RuntimeError, match="no validation images"):
        d.train_epoch(iter(()), None, 1)  # before setup there is no validation split
    d.calibrate(mnist.test_x[500:])
    raw = d.detector_score(x) + d.threshold
    assert (raw >= 0).all() and (raw <= 2 + 1e-6).all()  # an L1 distance of two distributions
    with torch.no_grad():  # Xu et al.'s rule written out
        p = trained_cnn(x).softmax(1)
        l1 = [(p - trained_cnn(sq).softmax(1)).abs().sum(1) for sq in (bit_depth(x, 1), median_filter(x, 2))]
        assert torch.equal(d.predict(x).rejected, torch.maximum(*l1) > d.threshold)
        assert torch.allclose(raw, torch.maximum(*l1), atol=1e-6)
    other = squeezing(trained_cnn)
    other.load_state_dict(d.state_dict())
    assert other.threshold == d.threshold


def test_the_surrogate_has_gradients_through_every_squeezer(trained_cnn, mnist):
    d = squeezing(trained_cnn, bit_depth=1, median_size=2, nlm_search=5, nlm_patch=3, nlm_h=20.0)
    d.threshold = 0.1
    x = mnist.test_x[:4].clone().requires_grad_(True)
    _, score = d.joint()(x)
    grad, = torch.autograd.grad(score.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("hp, match", [
    ({"fpr": 0.0}, "fpr=0.0"), ({"fpr": 1.0}, "fpr=1.0"), ({"fpr": -0.2}, "fpr"),
    ({"bit_depth": 9}, "bit_depth"), ({"median_size": 1}, "median_size"),
    ({"nlm_search": 4}, "odd"), ({"nlm_search": 11, "nlm_h": 0.0}, "nlm_h"),
    ({"bit_depth": 0, "median_size": 0}, "every squeezer is off")])
def test_bad_hyperparameters_are_one_clear_line(hp, match):
    with pytest.raises(DefenseConfigError, match=match) as e:
        FeatureSqueezing.make_params(hp)
    assert "\n" not in str(e.value)


def test_bad_fpr_in_a_sweep_spec_stops_before_ray():
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match="fpr"):
        parse({"defenses": {"feature_squeezing": {"space": {"fpr": [0.05, 1.5]}}}})
    parse({"defenses": ["feature_squeezing"]})


@pytest.mark.slow  # the registry-wide trial test runs this defense in the default run
def test_a_real_trial_calibrates_and_evaluates(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trial import run_trial

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 2, "train_samples": 600,
                  "eval_samples": 30, "batch_size": 100,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2},
                  "defenses": ["feature_squeezing"]})
    rec = run_trial({"defense": "feature_squeezing", "hp": {"bit_depth": 1, "median_size": 2},
                     "spec": spec, "run_dir": str(tmp_path)})
    assert rec.status == "completed", rec.error
    assert rec.epochs == 1  # stop_training: a second epoch would have nothing to learn
    assert [k for k in rec.acc if not k.startswith("check.")] == [
        "fgsm", "cw_extra-10x2", "opgd-20", "square_joint-100"]
    assert rec.robust_acc <= rec.clean_acc
