"""ATAT (attention-transfer adversarial training): the differentiable Grad-CAM it trains on
against captum, where the gradients of L_at go, the λ = 0 reduction to CE(nat) + CE(adv),
bad input, and one tiny end-to-end trial."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import LayerGradCam

from defenses.core import models, registry
from defenses.atat import (ATAT, ATATParams, atat_loss, attention_loss, cam_and_logits,
                           load_teacher, logit_pairing_loss, normalized_attention,
                           teacher_attention)
from defenses.core.base import DefenseConfigError, ThreatModel
from defenses.pgd_at import PGDAT, PGDATParams
from defenses.saliency.maps import grad_cam

THREAT = ThreatModel(eps=0.3, train_steps=2)


class Tiny(nn.Module):
    """Conv features (ReLU modules, not in place, for captum's hooks) + a two-layer head, so
    Grad-CAM's weights depend on more than one parameter tensor."""

    attention_layer = "features"

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), act(),
                                      nn.Conv2d(4, 6, 3, padding=1, stride=2), act())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 8), act(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.features(x))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


class WrongAttention(Tiny):
    attention_layer = "layer9"


@pytest.fixture(scope="module")
def cnn():
    """small_cnn after a few Adam steps on 256 mnist5k images: enough for non-trivial maps."""
    from defenses.core import data

    torch.manual_seed(0)
    ds = data.load("mnist5k")
    model = models.build("small_cnn", 10, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(0, 256, 64):
        opt.zero_grad()
        F.cross_entropy(model(ds.train_x[i:i + 64].float()), ds.train_y[i:i + 64]).backward()
        opt.step()
    return model.eval(), ds


def batch(n=6, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------ Grad-CAM against captum
@pytest.mark.parametrize("seed", range(3))
def test_differentiable_grad_cam_equals_captum_layer_grad_cam(seed):
    torch.manual_seed(seed)
    model = Tiny().eval()
    x, y = batch(seed=seed)
    ours = grad_cam(model, x, y, create_graph=True)
    captum = LayerGradCam(model, model.features).attribute(x, target=y, relu_attributions=True)
    assert ours.requires_grad and ours.shape == (6, 4, 4)
    torch.testing.assert_close(ours.detach(), captum[:, 0], rtol=1e-5, atol=1e-7)
    # the documented normalization: per-example unit L2 norm of the vectorized map
    expected = captum[:, 0].flatten(1)
    expected = expected / expected.norm(dim=1, keepdim=True).clamp_min(1e-8)
    torch.testing.assert_close(normalized_attention(ours).detach(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(normalized_attention(ours).norm(dim=1)[expected.norm(dim=1) > 0],
                          torch.tensor(1.0))


def test_teacher_attention_on_frozen_small_cnn_equals_captum(cnn):
    # small_cnn's in-place ReLUs: captum reads the same block output, so the maps agree
    trained_cnn, mnist = cnn
    teacher = copy.deepcopy(trained_cnn).requires_grad_(False)
    x, y = mnist.test_x[:8].float(), mnist.test_y[:8]
    ours = teacher_attention(teacher, x, y)
    captum = LayerGradCam(trained_cnn, trained_cnn.block2).attribute(x, target=y,
                                                                     relu_attributions=True)
    torch.testing.assert_close(ours, normalized_attention(captum[:, 0].detach()),
                               rtol=1e-4, atol=1e-6)
    assert not ours.requires_grad


def test_cam_and_logits_reuses_the_grad_cam_forward():
    torch.manual_seed(0)
    model = Tiny().eval()
    x, y = batch()
    cam, logits = cam_and_logits(model, x, y)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(cam, grad_cam(model, x, y, create_graph=True))
    assert logits.requires_grad and not model._forward_hooks  # the hook is removed


# ------------------------------------------------------------------ where the gradients go
def student_and_teacher(seed=0):
    torch.manual_seed(seed)
    student = Tiny().train()
    teacher = Tiny().eval().requires_grad_(False)
    return student, teacher


def test_attention_loss_gradients_reach_every_student_parameter_and_not_the_teacher():
    student, teacher = student_and_teacher()
    x, y = batch(n=16)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    t_att = teacher_attention(teacher, x, y)
    cam_adv, _ = cam_and_logits(student, x_adv, y)
    cam_nat, _ = cam_and_logits(student, x, y)
    l_at = attention_loss(t_att, normalized_attention(cam_adv), normalized_attention(cam_nat))
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(l_at, list(params.values()), allow_unused=True,
                                retain_graph=True)
    for name, g in zip(params, grads):
        if name.startswith("head.") and name.endswith("bias"):
            # a head bias moves ∂y_c/∂A at most through ReLU masks (piecewise constant): 0
            assert g is None or g.abs().sum() == 0, name
        else:
            # the head's weights enter L_at only through Grad-CAM's weights ∂y_c/∂A: a
            # non-zero gradient there is the double backpropagation at work
            assert g.abs().sum() > 0, name
    l_at.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_full_loss_backward_leaves_teacher_untouched():
    student, teacher = student_and_teacher(1)
    before = copy.deepcopy(teacher.state_dict())
    x, y = batch(n=16, seed=1)
    total, parts = atat_loss(student, x, x.flip(0), y, teacher_attention(teacher, x, y), 2.0, 0.5)
    total.backward()
    assert set(parts) == {"ce", "l_at", "l_lp"}
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


class Swapped(nn.Module):
    """``model`` with its last head weight taken from ``weight``: L_at as a function of one
    parameter tensor, for gradcheck."""

    attention_layer = "inner.features"

    def __init__(self, model, weight):
        super().__init__()
        self.inner, self.weight = model, weight

    def forward(self, inp):
        return torch.func.functional_call(self.inner, {"head.3.weight": self.weight}, (inp,))


def test_attention_loss_gradient_matches_finite_differences():
    # smooth activations make the double-backward path checkable by gradcheck in float64
    torch.manual_seed(0)
    student = Tiny(act=nn.Softplus).double().eval()
    x, y = batch(n=3)
    x, x_adv = x.double(), (x.double() + 0.05).clamp(0, 1)
    t_att = normalized_attention(torch.rand(3, 4, 4, dtype=torch.float64))

    def l_at(weight):
        s = Swapped(student, weight)
        return attention_loss(t_att,
                              normalized_attention(grad_cam(s, x_adv, y, create_graph=True)),
                              normalized_attention(grad_cam(s, x, y, create_graph=True)))

    weight = student.head[3].weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(l_at, (weight,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------ λ = 0 and the loss terms
def test_zero_lambdas_give_exactly_ce_natural_plus_ce_adversarial():
    student, _ = student_and_teacher(2)
    x, y = batch(n=16, seed=2)
    x_adv = (x + 0.2 * torch.rand_like(x)).clamp(0, 1)
    ref = copy.deepcopy(student)
    total, parts = atat_loss(student, x, x_adv, y, None, 0.0, 0.0)
    expected = F.cross_entropy(ref(x_adv), y) + F.cross_entropy(ref(x), y)
    assert torch.equal(total, expected)
    assert set(parts) == {"ce"}
    # BatchNorm-free Tiny: both models stayed identical; same running stats path as pgd_at


def test_zero_lambdas_loss_equals_pgd_at_with_clean_weight_one(cnn):
    trained_cnn, mnist = cnn
    x, y = mnist.train_x[:32].float(), mnist.train_y[:32]
    atat = ATAT(copy.deepcopy(trained_cnn).train(), ATATParams(0.0, 0.0, "random"), THREAT)
    pgd_at = PGDAT(copy.deepcopy(trained_cnn).train(), PGDATParams(clean_weight=1.0), THREAT)
    torch.manual_seed(5)
    ours = atat.loss(x, y, 1)
    torch.manual_seed(5)
    theirs = pgd_at.loss(x, y, 1)
    assert torch.equal(ours, theirs)
    # BatchNorm running statistics were updated in the same order as well
    for (k, a), b in zip(atat.model.state_dict().items(), pgd_at.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_total_is_ce_plus_weighted_terms():
    student, teacher = student_and_teacher(3)
    x, y = batch(n=8, seed=3)
    x_adv = (x + 0.1).clamp(0, 1)
    t_att = teacher_attention(teacher, x, y)
    total, parts = atat_loss(student, x, x_adv, y, t_att, 0.7, 0.2)
    assert torch.allclose(total.detach(), parts["ce"] + 0.7 * parts["l_at"] + 0.2 * parts["l_lp"])
    lp = logit_pairing_loss(student(x), student(x_adv))
    torch.testing.assert_close(parts["l_lp"], lp.detach())
    # L_at of a student equal to the teacher on clean inputs is its adversarial part only
    same = copy.deepcopy(teacher)
    s_nat = normalized_attention(grad_cam(same, x.requires_grad_(True), y))
    assert attention_loss(t_att, s_nat, s_nat) == 0


def test_lambda1_without_teacher_maps_is_an_error():
    student, _ = student_and_teacher()
    x, y = batch()
    with pytest.raises(ValueError, match="teacher"):
        atat_loss(student, x, x, y, None, 1.0, 0.0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("hp, where", [({"lambda1": -0.1}, "lambda1"), ({"lambda2": -1}, "lambda2"),
                                       ({"lambda1": float("nan")}, "lambda1"),
                                       ({"lambda2": float("inf")}, "lambda2"),
                                       ({"init": "imagenet"}, "init"), ({"lambda3": 1}, "lambda3")])
def test_bad_hyperparameters_are_one_line_config_errors(hp, where):
    with pytest.raises(DefenseConfigError) as err:
        ATAT.make_params(hp)
    assert where in str(err.value) and "\n" not in str(err.value)


def test_negative_lambda_in_a_sweep_spec_stops_before_ray():
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match="lambda1"):
        parse({"defenses": {"atat": {"space": {"lambda1": [0.0, -1.0]}}}})


@pytest.mark.parametrize("model, name", [(NoAttention(), "NoAttention"),
                                         (WrongAttention(), "layer9")])
def test_model_without_attention_layer_is_a_config_error(model, name):
    with pytest.raises(DefenseConfigError) as err:
        ATAT(model, ATATParams(), THREAT)
    assert name in str(err.value) and "\n" not in str(err.value)


def save_checkpoint(path: Path, net: nn.Module, **meta) -> Path:
    full = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
            "in_channels": 1, "seed": 0, "hp": {}, **meta}
    torch.save({"model": net.state_dict(), "meta": full}, path)
    return path


@pytest.mark.parametrize("meta", [{"dataset": "cifar10"}, {"model": "preact_resnet18"},
                                  {"num_classes": 100}, {"model": "no_such_net"}])
def test_teacher_of_another_dataset_or_architecture_is_a_config_error(tmp_path, meta):
    student = models.build("small_cnn", 10, 1)
    teacher_model = (models.build("preact_resnet18", 10, 1) if meta.get("model") == "preact_resnet18"
                     else student)
    path = save_checkpoint(tmp_path / "t.pt", teacher_model, **meta)
    with pytest.raises(DefenseConfigError) as err:
        load_teacher(path, student, "mnist5k", 10, 1, torch.device("cpu"))
    assert "teacher" in str(err.value) and "\n" not in str(err.value)


def test_missing_teacher_checkpoint_is_a_config_error(cnn):
    mnist = cnn[1]
    defense = ATAT(models.build("small_cnn", 10, 1), ATATParams(), THREAT)
    with pytest.raises(DefenseConfigError, match="teacher"):
        defense.setup(mnist, None)


# ------------------------------------------------------------------ setup: init, RNG, frozen
@pytest.mark.parametrize("init", ["teacher", "random"])
def test_setup_loads_a_frozen_teacher_and_initializes_the_student(tmp_path, cnn, init):
    trained_cnn, mnist = cnn
    path = save_checkpoint(tmp_path / "t.pt", trained_cnn)
    torch.manual_seed(0)
    student = models.build("small_cnn", 10, 1)
    fresh = copy.deepcopy(student.state_dict())
    defense = ATAT(student, ATATParams(init=init), THREAT)
    rng = torch.get_rng_state()
    defense.setup(mnist, path)
    assert torch.equal(rng, torch.get_rng_state())  # building the teacher drew no random numbers
    teacher = defense.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    expected = trained_cnn.state_dict() if init == "teacher" else fresh
    assert all(torch.equal(v, expected[k]) for k, v in student.state_dict().items())
    assert teacher is not student


def test_registered_with_its_search_space():
    from search_spaces import atat as space

    assert registry.get("atat") is ATAT
    assert ATAT.base_model(ATATParams()).defense == "standard"
    for key in ("lambda1", "lambda2"):
        grid = space.SPACE[key]
        assert 0.0 in grid and len([v for v in grid if v > 0]) >= 3
        for v in grid:
            ATAT.make_params({key: v})
    assert set(space.SPACE["init"]) == {"teacher", "random"}


# ------------------------------------------------------------------ end to end
def test_tiny_end_to_end_trial(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trial import LocalReporter, run_trial

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 100,
                  "eval_samples": 20, "batch_size": 50,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2},
                  "defenses": ["atat"]})
    reporter = LocalReporter(tmp_path / "trial")
    rec = run_trial({"defense": "atat", "hp": {"lambda1": 1.0, "lambda2": 0.5, "init": "teacher"},
                     "spec": spec, "run_dir": str(tmp_path)}, reporter)
    assert rec.status == "completed", rec.error
    assert 0.0 <= rec.robust_acc <= rec.clean_acc <= 1.0 and "fgsm" in rec.acc
    epoch = reporter.results[0]
    assert epoch["l_at"] > 0 and epoch["l_lp"] > 0 and epoch["ce"] > 0
    assert any((tmp_path / "bases").glob("*standard*/checkpoint.pt"))  # the cached teacher
