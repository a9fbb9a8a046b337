"""SAD (defenses/sad.py): saliency, BN-only re-estimation, variants, evaluation, bad input."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.core import data as data_lib
from defenses.core import models, registry
from defenses.attacks import PGD
from defenses.core.base import BaseModelRequest, DefenseConfigError, ThreatModel
from defenses.evaluation.benchmark import benchmark
from defenses.sad import SAD, SADParams, adapt_bn, normalize_map, saliency

EPS = 0.3
META = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
        "in_channels": 1, "seed": 0, "hp": {}}


def save_base(path, net, **meta):
    torch.save({"model": net.state_dict(), "meta": {**META, **meta}, "train_seconds": 1.0}, path)
    return path


@pytest.fixture(scope="module")
def base_ckpt(trained_cnn, tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "checkpoint.pt", trained_cnn)


@pytest.fixture(scope="module")
def train(mnist):
    return data_lib.as_float(mnist.train_x[:400]), mnist.train_y[:400]


@pytest.fixture(scope="module")
def test_batch(mnist):
    return mnist.test_x[:64], mnist.test_y[:64]


def batches(train, size=100):
    x, y = train
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def make_sad(mnist, base_ckpt, train=None, **hp):
    defense = SAD(models.build("small_cnn", 10, 1), SAD.make_params(hp), ThreatModel(EPS))
    defense.setup(mnist, base_ckpt)
    if train is not None:
        defense.train_epoch(batches(train), None, 1)
    return defense


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


# --- the public building blocks ------------------------------------------------------------------
def test_saliency_equals_an_independent_autograd_computation(trained_cnn, test_batch):
    x = test_batch[0][:6]
    s = saliency(trained_cnn, x)
    assert s.shape == x.shape and not s.requires_grad
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = trained_cnn(xi)[0]
        expected, = torch.autograd.grad(logits[logits.argmax()], xi)
        assert torch.allclose(s[i:i + 1], expected, atol=1e-6, rtol=1e-5)


def test_saliency_is_differentiable_in_x_with_create_graph():
    # a smooth model: its saliency really depends on x, so double backprop must see that
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    s = saliency(model, x, create_graph=True)
    second, = torch.autograd.grad(s.pow(2).sum(), x)
    assert s.requires_grad and second.abs().sum() > 0
    assert not saliency(model, x).requires_grad  # without create_graph: a constant for autograd


def test_adapt_bn_changes_only_running_statistics(trained_cnn, train):
    model = copy.deepcopy(trained_cnn).train()
    model.block1[1].eval()
    params = {k: p.clone() for k, p in model.named_parameters()}
    before = bn_buffers(model)
    shifted = [(x * 0.5 + 0.3) for x, _ in batches(train)]
    assert adapt_bn(model, shifted) == len(shifted)
    for k, p in model.named_parameters():  # conv/linear weights and BN γ, β: bit-identical
        assert torch.equal(p, params[k]), k
    after = bn_buffers(model)
    for k in before:
        if "num_batches" not in k:
            assert not torch.equal(before[k], after[k]), k
    assert model.training and not model.block1[1].training  # each module's mode given back
    assert all(bn.momentum == 0.1 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


def test_adapt_bn_cumulative_average_is_the_mean_of_batch_statistics(trained_cnn, train):
    model = copy.deepcopy(trained_cnn).eval()
    bn = model.block1[1]
    inputs = []
    handle = bn.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach()))
    adapt_bn(model, [x for x, _ in batches(train)])
    handle.remove()
    means = torch.stack([a.mean((0, 2, 3)) for a in inputs]).mean(0)
    variances = torch.stack([a.var((0, 2, 3), unbiased=True) for a in inputs]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    assert torch.allclose(bn.running_var, variances, rtol=1e-4)
    with torch.no_grad():  # an EMA (the paper's PyTorch default) keeps part of the old statistics
        ema = copy.deepcopy(trained_cnn)
        adapt_bn(ema, [x for x, _ in batches(train)][:1], momentum=0.1)
        assert not torch.allclose(ema.block1[1].running_mean, means, atol=1e-3)


def test_adapt_bn_rejects_models_without_batchnorm_and_empty_input(trained_cnn):
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_bn(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), [torch.rand(2, 1, 28, 28)])
    model = copy.deepcopy(trained_cnn)
    before = bn_buffers(model)
    with pytest.raises(ValueError, match="no batches"):
        adapt_bn(model, [])
    assert all(torch.equal(before[k], v) for k, v in bn_buffers(model).items())


def test_normalize_map():
    s = torch.randn(3, 1, 5, 5)
    assert torch.equal(normalize_map(s, "none"), s)
    assert torch.allclose(normalize_map(s, "linf").flatten(1).abs().amax(1), torch.ones(3))
    assert torch.allclose(normalize_map(s, "rms").flatten(1).pow(2).mean(1), torch.ones(3))


# --- the defense ---------------------------------------------------------------------------------
def test_registered_with_a_search_space_that_validates():
    from search_spaces.sad import KEY_HPARAMS, SPACE

    assert registry.get("sad") is SAD and "ratio" in SPACE and "ratio" in KEY_HPARAMS
    assert SAD.base_model(SAD.make_params({})) == BaseModelRequest(defense="standard")
    assert SAD.base_model(SAD.make_params({"base": "trades"})) == BaseModelRequest(defense="trades")


def test_full_sad_loads_phi0_updates_bn_once_and_stops(mnist, base_ckpt, trained_cnn, train):
    defense = make_sad(mnist, base_ckpt, ratio=0.8)
    assert all(torch.equal(a, b) for a, b in zip(defense.model.state_dict().values(),
                                                  trained_cnn.state_dict().values()))
    metrics = defense.train_epoch(batches(train), None, 1)
    assert defense.stop_training and defense.adapted
    assert metrics["bn_batches"] == 3  # bn_samples=256 by default: 100 + 100 + 56 images
    assert metrics["shift_linf"] > 0.05
    for (k, p), q in zip(defense.model.named_parameters(), trained_cnn.parameters()):
        assert torch.equal(p, q), k
    adapted = bn_buffers(defense.model)
    assert any(not torch.equal(v, trained_cnn.state_dict()[k]) for k, v in adapted.items())
    assert defense.train_epoch(batches(train), None, 2) == {"bn_batches": 0.0}  # no second pass
    assert all(torch.equal(v, bn_buffers(defense.model)[k]) for k, v in adapted.items())
    restored = make_sad(mnist, base_ckpt, ratio=0.8)
    restored.load_state_dict(defense.state_dict())
    assert restored.adapted


def test_bn_pass_inputs_follow_algorithm_1(mnist, base_ckpt, train):
    x, y = batches(train)[0]
    defense = make_sad(mnist, base_ckpt, ratio=0.8, step=0.5)
    xi = x.clone().requires_grad_(True)
    delta, = torch.autograd.grad(F.cross_entropy(defense.base(xi), y, reduction="sum"), xi)
    x_adv = (x + 0.5 * delta).clamp(0, 1)
    x_sadv = (x_adv + 0.8 * saliency(defense.base, x_adv)).clamp(0, 1)
    assert torch.allclose(defense.bn_input(x, y), x_sadv, atol=1e-6)
    ablation = make_sad(mnist, base_ckpt, ratio=0.8, step=0.5, variant="bn_adv")
    assert torch.allclose(ablation.bn_input(x, y), x_adv, atol=1e-6)  # no saliency added


def test_ablation_no_bn_keeps_phi0_and_adds_saliency(mnist, base_ckpt, trained_cnn, train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8, variant="no_bn")
    assert all(torch.equal(a, b) for a, b in zip(defense.model.state_dict().values(),
                                                  trained_cnn.state_dict().values()))
    x = test_batch[0]
    expected = trained_cnn((x + 0.8 * saliency(trained_cnn, x)).clamp(0, 1))
    assert torch.allclose(defense.predict(x).logits, expected, atol=1e-5)
    assert not torch.allclose(expected, trained_cnn(x), atol=1e-3)


def test_ablation_bn_adv_updates_bn_and_predicts_without_saliency(mnist, base_ckpt, trained_cnn,
                                                                   train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8, variant="bn_adv")
    assert any(not torch.equal(v, trained_cnn.state_dict()[k]) for k, v in bn_buffers(defense.model).items())
    x = test_batch[0]
    assert torch.equal(defense.predict(x).logits, defense.model.eval()(x))
    assert not defense.uses_saliency
    names = [a.name for a in defense.adaptive_attacks(EPS)]
    assert names == ["transfer-pgd-20", "square-100"]  # no saliency step to bypass


def test_ratio_zero_without_bn_update_reproduces_the_base_model_exactly(mnist, base_ckpt, trained_cnn,
                                                                        train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.0, variant="no_bn")
    x = test_batch[0]
    with torch.no_grad():
        assert torch.equal(defense.predict(x).logits, trained_cnn.eval()(x))


def test_prediction_uses_the_adapted_model_and_keeps_its_statistics(mnist, base_ckpt, train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8)
    model = defense.model.train()  # predict must not re-estimate statistics in train mode
    before = bn_buffers(model)
    x = test_batch[0]
    with torch.no_grad():  # what benchmark does: the saliency needs gradients anyway
        logits = defense.predict(x).logits
    assert model.training
    assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in before.items())
    model.eval()
    assert torch.allclose(logits, model((x + 0.8 * saliency(model, x)).clamp(0, 1)), atol=1e-5)


def test_plain_and_differentiable_predictors_compute_the_same_function(mnist, base_ckpt, train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8)
    x, y = test_batch[0][:8], test_batch[1][:8]
    plain, full = defense.predictor(), defense.differentiable_predictor()
    defense.model.eval()
    xi = x.clone().requires_grad_(True)
    assert torch.allclose(plain(xi), full(xi), atol=1e-5)
    # the differentiable one keeps a graph through the saliency step (create_graph)
    out = F.cross_entropy(full(xi), y)
    grad, = torch.autograd.grad(out, xi)
    assert grad.shape == x.shape


def test_adaptive_attacks_and_clean_at_least_robust(mnist, base_ckpt, train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8)
    names = [a.name for a in defense.adaptive_attacks(EPS)]
    assert names == ["transfer-pgd-20", "bpda-pgd-20", "diff-pgd-20", "square-100", "eot_pgd-20x4"]
    x, y = test_batch[0][:32], test_batch[1][:32]
    torch.manual_seed(0)
    result = benchmark(defense, x, y, EPS, ["fgsm"], batch_size=32)
    assert result.clean_acc >= result.robust_acc
    accs = list(result.acc.values())
    assert accs == sorted(accs, reverse=True) and accs[0] <= result.clean_acc
    assert set(result.acc) == {"fgsm", *names}
    assert result.robust_acc < 0.5  # a standard Φ⁰ with BN statistics moved is no robust model


def test_adaptive_budget_follows_the_threat_model_and_paper_attacks(mnist, base_ckpt, test_batch):
    defense = SAD(models.build("small_cnn", 10, 1), SADParams(),
                  ThreatModel(EPS, attacks=("fgsm", "pgd-40", "apgd_t-50x3")))
    defense.setup(mnist, base_ckpt)
    assert defense.adaptive_steps() == 50
    assert [a.name for a in defense.adaptive_attacks(EPS)][-2:] == ["square-250", "eot_pgd-50x4"]
    paper = defense.paper_attacks(EPS, eot_samples=2)
    assert [a.name for a in paper] == ["weak_pgd-20", "pgd-20", "cw_c0.2-50", "eot_pgd-12x2"]
    assert all(a.eps == EPS for a in paper)  # all counted in the threat model's ε
    x, y = test_batch[0][:8], test_batch[1][:8]
    assert float((paper[0](x, y) - x).abs().max()) <= EPS / 2 + 1e-6  # WeakPGD: half the radius


def test_eot_pgd_is_in_the_adaptive_set_at_the_adaptive_budget(mnist, base_ckpt, train, test_batch):
    """The paper's EOT-PGD (Gaussian noise σ = ε/3 around the input) at K steps × 4 samples:
    the same attack as paper_attacks' one, with the adaptive budget instead of 12 × 32."""
    from defenses.attacks.adaptive import EOTPGD

    defense = make_sad(mnist, base_ckpt, train, ratio=0.8)
    eot = defense.adaptive_attacks(EPS)[-1]
    paper = defense.paper_attacks(EPS, eot_samples=2)[-1]
    assert isinstance(eot, EOTPGD) and isinstance(paper, EOTPGD)
    assert (eot.steps, eot.samples, eot.model) == (20, 4, defense.predictor())
    assert eot.transform is not None and paper.transform is not None
    x, y = test_batch[0][:8], test_batch[1][:8]
    torch.manual_seed(0)
    noisy = eot.transform(x)
    assert 0.03 < float((noisy - x).std()) < 0.15  # σ = ε/3 = 0.1 (less where clipped at 0)
    adv = eot(x, y)
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    with torch.no_grad():
        assert (defense.predict(adv).logits.argmax(1) == y).float().mean() < \
            (defense.predict(x).logits.argmax(1) == y).float().mean()


def test_bpda_attack_bypasses_the_saliency_step(mnist, base_ckpt, train, test_batch):
    defense = make_sad(mnist, base_ckpt, train, ratio=0.8)
    bpda = defense.adaptive_attacks(EPS)[1]
    x, y = test_batch[0][:16], test_batch[1][:16]
    adv = bpda(x, y)
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert isinstance(bpda, PGD) and bpda.step == "saliency_step"


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("hp, match", [
    ({"ratio": -0.1}, "ratio=-0.1 must be a finite number ≥ 0"),
    ({"ratio": float("nan")}, "ratio"),
    ({"step": 0.0}, "step=0.0 must be a number > 0"),
    ({"base": "pgd_at"}, "base='pgd_at' is not one of standard, trades"),
    ({"variant": "half"}, "variant='half'"),
    ({"normalize": "l1"}, "normalize='l1'"),
    ({"bn_momentum": 0.0}, "bn_momentum"),
    ({"bn_samples": 0}, "bn_samples"),
    ({"eta": 0.5}, "has no hyperparameter 'eta'"),
])
def test_bad_hyperparameters_raise_one_clear_line(hp, match):
    with pytest.raises(DefenseConfigError, match=match) as err:
        SAD.make_params(hp)
    assert "\n" not in str(err.value)


def test_negative_ratio_stops_the_sweep_spec():
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match="ratio=-0.5"):
        parse({"defenses": {"sad": {"space": {"ratio": [0.5, -0.5]}}}})


def test_model_without_batchnorm_is_named_in_the_error(mnist, base_ckpt):
    class NoBNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    defense = SAD(NoBNNet(), SADParams(), ThreatModel(EPS))
    with pytest.raises(DefenseConfigError, match="model NoBNNet has no BatchNorm layer"):
        defense.setup(mnist, base_ckpt)
    with pytest.raises(DefenseConfigError, match="NoBNNet"):
        SAD.check_model(NoBNNet())
    SAD.check_model(models.build("small_cnn", 10, 1))  # the models we ship all have BN


def test_missing_unreadable_and_incompatible_checkpoints(mnist, trained_cnn, tmp_path):
    def setup(path, **hp):
        SAD(models.build("small_cnn", 10, 1), SAD.make_params(hp), ThreatModel(EPS)).setup(mnist, path)

    with pytest.raises(DefenseConfigError, match="no base checkpoint given"):
        setup(None)
    with pytest.raises(DefenseConfigError, match="not found"):
        setup(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DefenseConfigError, match="unreadable"):
        setup(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DefenseConfigError, match="no 'model'/'meta'"):
        setup(tmp_path / "other.pt")
    cases = [({"dataset": "cifar10"}, {}, "its dataset is 'cifar10', this trial needs 'mnist5k'"),
             ({}, {"base": "trades"}, "its defense is 'standard', this trial needs 'trades'"),
             ({"model": "resnet"}, {}, "unknown model 'resnet'"),
             ({"model": "preact_resnet18"}, {}, "its model is 'preact_resnet18'")]
    for i, (meta, hp, match) in enumerate(cases):
        path = save_base(tmp_path / f"bad{i}.pt", trained_cnn, **meta)
        with pytest.raises(DefenseConfigError, match=match):
            setup(path, **hp)
    state = {k: v for k, v in trained_cnn.state_dict().items() if not k.startswith("head")}
    torch.save({"model": state, "meta": META}, tmp_path / "partial.pt")
    with pytest.raises(DefenseConfigError, match="does not fit the model"):
        setup(tmp_path / "partial.pt")


# --- end to end through the trial loop -------------------------------------------------------------
@pytest.mark.slow  # ~40 s: two SAD trials and their base model
def test_run_trial_trains_the_base_once_and_reuses_it(tmp_path, monkeypatch, mnist):
    import orchestrator.trial as trial_lib
    import orchestrator.training as training_lib
    from orchestrator.spec import parse

    # the session's copy of mnist5k instead of three more loads (seconds each)
    monkeypatch.setattr(data_lib, "load", lambda name, root=None, seed=0: mnist)
    trained = []
    real_train = training_lib.train

    def counting_train(s, epochs, *args, **kwargs):
        trained.append(s.defense_name)
        return real_train(s, epochs, *args, **kwargs)

    monkeypatch.setattr(trial_lib, "train", counting_train)     # the trial's loop
    monkeypatch.setattr(training_lib, "train", counting_train)  # the base model's
    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 2, "train_samples": 300,
                  "eval_samples": 40, "batch_size": 100,
                  "threat_model": {"eps": EPS, "attacks": ["fgsm"], "train_steps": 2},
                  "defenses": ["sad"]})
    records = [trial_lib.run_trial({"defense": "sad", "hp": {"ratio": r}, "spec": spec,
                                    "run_dir": str(tmp_path)}) for r in (0.8, 0.4)]
    assert trained == ["standard", "sad", "sad"]
    assert len([p for p in (tmp_path / "bases").iterdir() if p.is_dir()]) == 1
    for rec in records:
        assert rec.status == "completed", rec.error
        assert rec.epochs == 1  # one BN pass, then stop_training
        assert rec.clean_acc >= rec.robust_acc
        assert {"transfer-pgd-20", "bpda-pgd-20", "diff-pgd-20", "square-100"} <= set(rec.acc)
    base = next(p for p in (tmp_path / "bases").iterdir() if p.is_dir()) / "checkpoint.pt"
    base_seconds = torch.load(base, weights_only=True)["train_seconds"]
    assert base_seconds > 0 and records[0].train_seconds > 0
    assert os.path.getsize(base) > 0
