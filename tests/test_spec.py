"""Every bad spec stops with one clear line before Ray starts."""
import pytest

from orchestrator.spec import PRESETS, SpecError, load, parse


def error_of(raw):
    with pytest.raises(SpecError) as e:
        parse(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_presets_are_valid():
    for name in PRESETS:
        spec = load(preset=name)
        assert spec.total_trials() >= 2


def test_default_preset_sweeps_every_registered_defense_twice():
    from defenses.core import registry

    spec = load(preset="default")
    assert sorted(spec.defenses) == registry.names()
    assert all(spec.trials_for(d) >= 2 for d in spec.defenses)
    assert spec.dataset == "mnist5k"


@pytest.mark.parametrize("raw,needle", [
    ({"defenses": ["standard"], "epoch": 3}, "did you mean 'epochs'"),
    ({"defenses": ["standard"], "threat_model": {"esp": 0.1}}, "did you mean 'eps'"),
    ({"defenses": ["standard"], "epochs": "many"}, "epochs"),
    ({"defenses": ["standard"], "threat_model": {"eps": -0.1}}, "threat_model.eps"),
    ({"defenses": ["standard"], "threat_model": {"eps": 1.5}}, "threat_model.eps"),
    ({"defenses": {"trades": {"space": {}}}}, "empty search space"),
    ({"defenses": {"trades": {"space": {"beta": []}}}}, "empty list of choices"),
    ({"defenses": ["madry"]}, "registered defenses: "),
    ({"defenses": ["standard"], "dataset": "svhn"}, "valid datasets: mnist5k"),
    ({"defenses": ["standard"], "model": "vgg"}, "valid models: small_cnn"),
    ({"defenses": ["standard"], "threat_model": {"attacks": ["pgd-40", "bim"]}}, "valid attacks:"),
    ({"defenses": ["standard"], "trials_per_defense": 0}, "trials_per_defense"),
    ({"defenses": {"standard": {"trials": -1}}}, "defenses.standard.trials"),
    ({"defenses": {"trades": {"space": {"beta": -2.0}}}}, "beta=-2.0 must be ≥ 0"),
    ({"defenses": {"trades": {"space": {"gamma": 1.0}}}}, "no hyperparameter 'gamma'"),
    ({"defenses": {"trades": {"space": {"beta": {"low": 5, "high": 1}}}}}, "low < high"),
    ({"defenses": {"standard": {"space": {"lr": 0}}}}, "must be a number > 0"),
    ({"defenses": []}, "defenses"),
    ({"defenses": ["pgd_at"], "threat_model": {"train_precision": "fp8"}}, "'fp32', 'bf16' or 'fp16'"),
    ({"defenses": ["feature_squeezing"], "threat_model": {"fpr": 0.6}}, "fpr must be in (0, 0.5]"),
    ({"defenses": ["fgsm_rs"], "train_samples": 200}, "fgsm_rs keeps 256 training images out of "
                                                      "training for its checks, so it needs train_samples ≥ 257"),
    ({"defenses": ["standard"], "validation_samples": -1}, "validation_samples"),
    ({"defenses": ["standard"], "resources": {"gpus_per_trial": 2}},
     "gpus_per_trial=2: one training process uses one GPU; for a trial on several GPUs set "
     "gpus_per_trial: 1 and workers_per_trial: 2"),
])
def test_bad_specs_name_what_is_wrong(raw, needle):
    assert needle in error_of(raw)


def test_train_precision_reaches_the_defenses_threat_model():
    import torch

    spec = parse({"defenses": ["pgd_at"], "threat_model": {"train_precision": "bf16"}})
    assert spec.threat_model.threat_model().attack_dtype == torch.bfloat16
    assert parse({"defenses": ["pgd_at"]}).threat_model.threat_model().attack_dtype is None


def test_space_override_syntax():
    spec = parse({"defenses": {"trades": {"trials": 3, "space": {"beta": [1.0, 6.0],
                                                                "lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}})
    assert spec.trials_for("trades") == 3


def test_missing_spec_file_and_unknown_preset(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="valid presets: smoke, default"):
        load(preset="huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defenses: [standard\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load(bad)


def test_a_defense_that_cannot_use_the_model_stops_at_the_spec(monkeypatch):
    # SAD needs BatchNorm, ATAT an attention layer: checked on the spec's model before Ray starts
    import torch.nn as nn

    from defenses.core import models as model_lib

    class Plain(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    monkeypatch.setattr(model_lib, "build", lambda name, classes, channels: Plain())
    with pytest.raises(SpecError, match=r"^spec error at model: sad: model Plain has no BatchNorm"):
        parse({"defenses": {"sad": {"trials": 1}}})
    with pytest.raises(SpecError, match=r"^spec error at model: atat: model Plain names no attention"):
        parse({"defenses": {"atat": {"trials": 1}}})
    parse({"defenses": {"standard": {"trials": 1}}})  # no requirement: fine
