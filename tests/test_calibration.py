"""Detector thresholds at a stated FPR: the validation split held out of all training, the
realized FPR on unseen clean images, the bad-input errors, and the detector metric columns."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from defenses import attacks
from defenses.core import data, models
from defenses.core.base import DefenseConfigError, ThreatModel
from defenses.evaluation.detection import craft, detection_report, detector_metrics
from defenses.feature_squeezing import FeatureSqueezing
from defenses.gradcam_detector import GradCAMDetector
from defenses.saliency_detector import SaliencyDetector

EPS = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


# --- the validation split --------------------------------------------------------------------

def test_validation_split_is_disjoint_and_the_default_training_images_are_unchanged(tmp_path):
    from orchestrator.spec import load
    from orchestrator.training import build_setup

    spec = load(preset="default")
    assert spec.validation_samples == 1000 and spec.train_samples == 2000
    full = data.load(spec.dataset, seed=spec.seed)  # the seeded order, no split
    cpu = torch.device("cpu")
    s = build_setup(spec, "standard", {}, cpu, tmp_path)
    # 2000 + 1000 ≤ 4000: the training images are exactly the first 2000, as without a split
    assert torch.equal(s.data.train_x, full.train_x[:2000])
    assert torch.equal(s.data.train_y, full.train_y[:2000])
    assert torch.equal(s.data.val_x, full.train_x[-1000:]) and torch.equal(s.data.val_y, full.train_y[-1000:])
    assert not _rows(s.data.val_x) & _rows(s.data.train_x)
    assert not _rows(s.data.val_x) & _rows(full.test_x)
    # a defense with a holdout: holdout + its training images are the same first 2000
    r = build_setup(spec, "fgsm_rs", {}, cpu, tmp_path)
    assert torch.equal(torch.cat([r.holdout[0], r.data.train_x]), full.train_x[:2000])
    assert torch.equal(r.data.val_x, s.data.val_x)

    # without train_samples every image but the validation split trains
    whole = build_setup(spec.model_copy(update={"train_samples": None}), "standard", {}, cpu, tmp_path)
    assert len(whole.data.train_y) == 4000 - 1000
    assert torch.equal(torch.cat([whole.data.train_x, whole.data.val_x]), full.train_x)
    none = build_setup(spec.model_copy(update={"validation_samples": 0}), "standard", {}, cpu, tmp_path)
    assert none.data.n_val == 0 and torch.equal(none.data.train_x, full.train_x[:2000])


def test_base_models_train_without_the_validation_split():
    from defenses.core.base import BaseModelRequest
    from orchestrator.training import base_key
    from orchestrator.spec import load

    spec = load(preset="default")
    request = BaseModelRequest("standard")
    # the split changes the base's training images (so its cache key) ...
    assert base_key(spec, request) != base_key(spec.model_copy(update={"validation_samples": 0}), request)
    # ... a detector's FPR does not: every fpr guards the same classifier
    threat = spec.threat_model.model_copy(update={"fpr": 0.1})
    assert base_key(spec, request) == base_key(spec.model_copy(update={"threat_model": threat}), request)


# --- bad input -------------------------------------------------------------------------------

def _spec_error(raw) -> str:
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError) as e:
        parse(raw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("fpr", [0.0, -0.05, 0.51, 1.0, float("nan")])
def test_an_fpr_outside_0_to_half_is_one_line(fpr):
    msg = _spec_error({"defenses": ["feature_squeezing"], "threat_model": {"fpr": fpr}})
    assert msg.startswith("spec error at threat_model.fpr: fpr must be in (0, 0.5]"), msg
    with pytest.raises(ValueError, match=r"fpr must be in \(0, 0.5\]"):
        ThreatModel(EPS, fpr=fpr)


def test_the_spec_fpr_reaches_the_threat_model():
    from orchestrator.spec import parse

    spec = parse({"defenses": ["feature_squeezing"], "threat_model": {"fpr": 0.5}})
    assert spec.threat_model.threat_model().fpr == 0.5
    assert parse({"defenses": ["standard"]}).threat_model.threat_model().fpr == 0.05


@pytest.mark.parametrize("raw, needle", [
    ({"validation_samples": 4000}, "spec error at validation_samples: 4000 leaves no training images "
                                   "(mnist5k has 4000)"),
    ({"train_samples": 3800}, "3800 training images asked for, but mnist5k has 4000 and "
                              "validation_samples=256 leaves 3744"),
    ({"defenses": ["fgsm_rs"], "train_samples": 200},
     "fgsm_rs keeps 256 training images out of training for its checks, so it needs "
     "train_samples ≥ 257, got 200"),
    ({"defenses": ["gradcam_detector"], "train_samples": 200}, "needs train_samples ≥ 201"),
    ({"defenses": ["fgsm_rs"], "validation_samples": 3800}, "lower validation_samples to ≤ 3743"),
])
def test_too_few_training_images_is_one_line(raw, needle):
    msg = _spec_error({"defenses": ["standard"], **raw})
    assert needle in msg, msg


def test_enough_training_images_pass():
    from orchestrator.spec import parse

    parse({"defenses": ["fgsm_rs"], "train_samples": 257})
    parse({"defenses": ["standard"], "train_samples": 3744})
    parse({"defenses": ["fgsm_rs"], "validation_samples": 0, "train_samples": 4000})


def test_a_split_larger_than_the_files_hold_is_one_line():
    small = data.Dataset("cifar10", torch.zeros(20, 3, 4, 4), torch.zeros(20, dtype=torch.long),
                         torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), 10)
    with pytest.raises(data.DatasetError, match="validation_samples=256 leaves no training images: "
                                                "cifar10 has 20") as e:
        data.hold_out_validation(small, 256)
    assert "\n" not in str(e.value)
    split = data.hold_out_validation(small, 5)
    assert (len(split.train_y), split.n_val) == (15, 5)


# --- the realized FPR on unseen clean images -------------------------------------------------

@pytest.fixture(scope="module")
def base(cnn_first_1000, tmp_path_factory):
    """A classifier trained on the first 1000 training images, saved as a base checkpoint."""
    model = cnn_first_1000
    path = tmp_path_factory.mktemp("base") / "checkpoint.pt"
    meta = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
            "in_channels": 1, "seed": 0, "hp": {}}
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


def _with_validation(mnist, n_val: int = 1000):
    # the classifier trained on the first 1000; the last n_val are clean images it never saw
    return dataclasses.replace(mnist, train_x=mnist.train_x[:1000], train_y=mnist.train_y[:1000],
                               val_x=mnist.train_x[-n_val:], val_y=mnist.train_y[-n_val:])


def _built(cls, hp, threat_fpr, dataset, base):
    d = cls(models.build("small_cnn", 10, 1), cls.make_params(hp), ThreatModel(EPS, fpr=threat_fpr))
    d.setup(dataset, base)
    d.train_epoch(iter(()), None, 1)  # the calibrating epoch: it reads the validation split
    assert d.stop_training and d.threshold is not None
    return d


@pytest.mark.parametrize("cls, hp, threat_fpr, target", [
    (FeatureSqueezing, {}, 0.05, 0.05),                       # the threat model's FPR
    (FeatureSqueezing, {"fpr": 0.10}, 0.05, 0.10),            # an explicit fpr overrides it
    (GradCAMDetector, {"theta": 0.1}, 0.05, 0.05),            # the default margin rule
    (GradCAMDetector, {"theta": 0.3, "enhancement": "zero_mean"}, 0.10, 0.10),
])
def test_realized_fpr_on_unseen_clean_images_is_within_2_points(mnist, base, cls, hp, threat_fpr, target):
    """Threshold on 1000 validation images, FPR measured on the 1000 test images: both unseen
    by the classifier, same distribution (±2 points is about two standard errors here)."""
    d = _built(cls, hp, threat_fpr, _with_validation(mnist), base)
    assert d.target_fpr == target
    with torch.no_grad():
        own = torch.cat([d.predict(d.val_x[i:i + 250]).rejected for i in range(0, 1000, 250)])
        test = torch.cat([d.predict(mnist.test_x[i:i + 250]).rejected for i in range(0, 1000, 250)])
    assert abs(own.float().mean().item() - target) <= 0.002  # the quantile, on its own images
    assert abs(test.float().mean().item() - target) <= 0.02, test.float().mean().item()


def test_the_paper_rule_needs_no_validation_split(mnist, base):
    d = GradCAMDetector(models.build("small_cnn", 10, 1), GradCAMDetector.make_params(
        {"theta": 0.3, "rule": "paper"}), ThreatModel(EPS))
    d.setup(mnist, base)  # no val_x: the label comparison has no threshold to set
    assert d.train_epoch(iter(()), None, 1) == {} and d.threshold == 0.0


@pytest.mark.parametrize("cls, hp", [(FeatureSqueezing, {}), (GradCAMDetector, {}),
                                     (SaliencyDetector, {"detector": "id"})])
def test_a_detector_without_validation_images_is_a_config_error(mnist, base, cls, hp):
    d = cls(models.build("small_cnn", 10, 1), cls.make_params(hp), ThreatModel(EPS))
    no_split = dataclasses.replace(mnist, train_x=mnist.train_x[:300], train_y=mnist.train_y[:300])
    with pytest.raises(DefenseConfigError) as e:
        d.setup(no_split, base)
    assert str(e.value) == (f"{cls.name}: sets its threshold on the validation split, which is "
                            "empty; set validation_samples > 0 in the spec")


# --- detector metric columns -----------------------------------------------------------------

def test_detector_metrics_columns(mnist, base):
    d = _built(FeatureSqueezing, {}, 0.05, _with_validation(mnist, 256), base)
    x, y = mnist.test_x[:120], mnist.test_y[:120]
    fgsm = attacks.make("fgsm", d.model, EPS)
    pgd = attacks.make("pgd-5", d.model, EPS)
    torch.manual_seed(0)
    m = detector_metrics(d, x, y, [fgsm, pgd], batch_size=50)
    names = ("fgsm", "pgd-5")
    assert set(m) == {"fpr", "ospa"} | {f"{k}.{a}" for a in names
                                        for k in ("detection", "n_fooled", "auroc", "tpr_at_fpr")}
    with torch.no_grad():
        logits, rejected = d.predict(x)
    correct = logits.argmax(1) == y
    assert m["fpr"] == pytest.approx(rejected.float().mean().item())
    assert m["ospa"] == pytest.approx((correct & ~rejected).float().mean().item())
    # FGSM is deterministic: the same numbers as the report over every input
    report = detection_report(d, x, y, craft([fgsm], x, y), fpr=0.05).attacks["fgsm"]
    assert m["n_fooled.fgsm"] == report.fooled > 20
    assert m["detection.fgsm"] == pytest.approx(report.detection_rate)
    assert m["auroc.fgsm"] == pytest.approx(report.auroc)
    assert m["tpr_at_fpr.fgsm"] == pytest.approx(report.tpr_at_fpr)
    assert 0 < m["n_fooled.pgd-5"] <= int(correct.sum())
    assert 0.0 <= m["detection.pgd-5"] <= 1.0 and 0.0 <= m["auroc.pgd-5"] <= 1.0
    # no input classified correctly: nothing is attacked, nothing fooled
    none_right = detector_metrics(d, x[:10], torch.full((10,), -1), [fgsm])
    assert none_right["n_fooled.fgsm"] == 0 and math.isnan(none_right["detection.fgsm"])
    with pytest.raises(TypeError, match="not a detector"):
        detector_metrics(torch.nn.Identity(), x, y, [fgsm])


def test_the_realized_fpr_is_measured_on_every_test_image_given(mnist, base):
    """A trial attacks 300 points but its FPR comes from the whole test split: at 5 %, 300
    images leave a ±2.5-point interval, wider than the ±2 points the FPR is held to."""
    from defenses.evaluation.benchmark import EvalSpec, evaluate
    from orchestrator.records import TrialRecord
    from orchestrator.stats import wilson_interval

    d = _built(FeatureSqueezing, {}, 0.05, _with_validation(mnist), base)
    x, y = mnist.test_x[:40], mnist.test_y[:40]
    spec = EvalSpec(eps=(EPS,), attacks=("fgsm",), masking=None, adaptive=False)
    report = evaluate(d, (x, y), spec, fpr_images=mnist.test_x)
    with torch.no_grad():
        rejected = torch.cat([d.predict(mnist.test_x[i:i + 250]).rejected for i in range(0, 1000, 250)])
    assert report.metrics["n_fpr"] == 1000
    assert report.metrics["fpr"] == pytest.approx(rejected.float().mean().item())
    assert evaluate(d, (x, y), spec).metrics["n_fpr"] == 40  # default: the evaluated points
    rec = TrialRecord("t", "feature_squeezing", "mnist5k", "small_cnn", 0)
    rec.set_evaluation(report)
    k = round(report.metrics["fpr"] * 1000)
    assert rec.metrics["fpr_ci_low"] < report.metrics["fpr"] < rec.metrics["fpr_ci_high"]
    assert (rec.metrics["fpr_ci_low"], rec.metrics["fpr_ci_high"]) == pytest.approx(wilson_interval(k, 1000))
