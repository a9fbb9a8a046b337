"""The generic adaptive attacks: BPDA, EOT-PGD, transfer."""
import pytest
import torch
import torch.nn as nn

from defenses.attacks import PGD
from defenses.attacks.adaptive import (BPDA, EOTPGD, Transfer, gaussian_noise, identity_backward,
                                       straight_through, transfer_pgd)

EPS = 0.3


class Quantize(nn.Module):
    """A gradient-masking preprocessing step: rounding has a zero gradient everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Defended(nn.Module):
    def __init__(self, classifier, noise: float = 0.0):
        super().__init__()
        self.quantize = Quantize()
        self.classifier = classifier
        self.noise = noise

    def forward(self, x):
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return self.classifier(self.quantize(x))


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.test_x[:48], mnist.test_y[:48]


def test_straight_through_keeps_the_value_and_passes_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.round(x * 3) ** 2
    z = straight_through(x, y)
    assert torch.equal(z, y)
    grad, = torch.autograd.grad((z * torch.arange(4.0)).sum(), x)
    assert torch.equal(grad, torch.arange(4.0).expand(3, 4))


def test_identity_backward_only_inside_the_block(trained_cnn, batch):
    model = Defended(trained_cnn).eval()
    x = batch[0][:4].clone().requires_grad_(True)
    with identity_backward(model, "quantize"):
        out = model(x)
        grad, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, model(x))  # the forward value is the defense's own
    assert grad.abs().sum() > 0
    grad, = torch.autograd.grad(model(x).sum(), x)
    assert grad.abs().sum() == 0  # hook removed: the true (masked) gradient again


def test_bpda_breaks_a_masking_preprocessor_that_plain_pgd_cannot(trained_cnn, batch):
    x, y = batch
    model = Defended(trained_cnn).eval()
    torch.manual_seed(0)
    plain = PGD(model, EPS, steps=10)(x, y)
    torch.manual_seed(0)
    adv = BPDA(model, EPS, step="quantize", steps=10)(x, y)
    assert accuracy(model, x, y) > 0.9
    assert accuracy(model, plain, y) > 0.5   # zero gradients: only the random start moved it
    assert accuracy(model, adv, y) < 0.2
    assert float((adv - x).abs().max()) <= EPS + 1e-6


def test_bpda_checks_the_step_name_and_shape(trained_cnn):
    model = Defended(trained_cnn)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        BPDA(model, EPS, step="nope")
    squash = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    attack = BPDA(squash, EPS, step="0", steps=1)
    with pytest.raises(ValueError, match="equal shapes"):
        attack(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert attack.name == "bpda-pgd-1"


def test_eot_with_one_sample_and_no_transform_is_pgd(trained_cnn, batch):
    x, y = batch
    torch.manual_seed(3)
    a = PGD(trained_cnn, EPS, steps=5, alpha=0.05)(x, y)
    torch.manual_seed(3)
    b = EOTPGD(trained_cnn, EPS, steps=5, samples=1, alpha=0.05)(x, y)
    assert torch.equal(a, b)


def test_eot_gradient_is_the_mean_over_samples(trained_cnn, batch):
    x, y = batch[0][:8], batch[1][:8]
    model = Defended(trained_cnn, noise=0.2).eval()
    attack = EOTPGD(model, EPS, steps=1, samples=4)
    torch.manual_seed(1)
    mean = attack.expected_gradient(x, y)
    torch.manual_seed(1)
    singles = []
    for _ in range(4):
        xi = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(nn.functional.cross_entropy(model(xi), y, reduction="sum"), xi)
        singles.append(g)
    assert torch.allclose(mean, torch.stack(singles).mean(0), atol=1e-6)
    assert attack.name == "eot_pgd-1x4"


def test_eot_through_noise_transform_attacks_and_stays_in_the_ball(trained_cnn, batch):
    x, y = batch
    attack = EOTPGD(trained_cnn, EPS, steps=5, samples=2, transform=gaussian_noise(0.05))
    adv = attack(x, y)
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert accuracy(trained_cnn, adv, y) < accuracy(trained_cnn, x, y)


def test_eot_rejects_bad_settings(trained_cnn):
    with pytest.raises(ValueError, match="positive"):
        EOTPGD(trained_cnn, EPS, samples=0)
    with pytest.raises(ValueError, match="unknown loss"):
        EOTPGD(trained_cnn, EPS, loss="hinge")
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(-1.0)


def test_transfer_crafts_on_the_surrogate_only(trained_cnn, batch):
    x, y = batch
    calls = []

    def judged(images):  # the defense: a transfer attack must never query it
        calls.append(1)
        return trained_cnn(images)

    torch.manual_seed(0)
    attack = transfer_pgd(trained_cnn, EPS, steps=5)
    adv = attack(x, y)
    torch.manual_seed(0)
    same = PGD(trained_cnn, EPS, steps=5)(x, y)
    assert torch.equal(adv, same) and not calls
    assert attack.name == "transfer-pgd-5"
    assert isinstance(attack, Transfer) and accuracy(judged, adv, y) < 0.3


def test_smooth_relu_gives_an_input_gradient_a_derivative_only_inside_the_block(trained_cnn, batch):
    from defenses.core import models
    from defenses.attacks.adaptive import smooth_relu

    def curvature(model, x):
        x = x.clone().requires_grad_(True)
        logits = model(x)
        g, = torch.autograd.grad(logits[:, 0].sum(), x, create_graph=True)
        h, = torch.autograd.grad(g.pow(2).sum(), x, allow_unused=True)
        return logits, torch.zeros_like(x) if h is None else h

    x = batch[0][:4]
    relu_logits, flat = curvature(trained_cnn, x)
    assert not flat.any()  # a ReLU network's input gradient is piecewise constant
    with smooth_relu(10.0):
        soft_logits, curved = curvature(trained_cnn, x)
    assert curved.abs().sum() > 0
    assert (soft_logits - relu_logits).abs().max() < 1.0  # close to the network it stands for
    assert torch.equal(curvature(trained_cnn, x)[0], relu_logits)  # and gone after the block
    # F.relu inside forward() (PreAct ResNet) is replaced as well as nn.ReLU modules
    resnet = models.build("preact_resnet18", 10, 1).eval()
    assert not curvature(resnet, x[:2])[1].any()
    with smooth_relu(10.0):
        assert curvature(resnet, x[:2])[1].abs().sum() > 0
    with pytest.raises(ValueError, match="beta"):
        smooth_relu(0.0)


def test_bim_has_no_random_start_and_restarted_pgd_names_its_runs(trained_cnn, batch):
    from defenses.attacks.pgd import BIM, pgd_restarts

    x, y = batch
    bim = BIM(trained_cnn, EPS, steps=5, alpha=EPS / 5)
    torch.manual_seed(0)
    a = bim(x, y)
    torch.manual_seed(1)
    assert torch.equal(a, bim(x, y)) and bim.name == "bim-5"  # deterministic: no random start
    assert float((a - x).abs().max()) <= EPS + 1e-6 and accuracy(trained_cnn, a, y) < 0.3
    restarted = pgd_restarts(trained_cnn, EPS, 5, 3)
    assert restarted.name == "pgd-5x3" and restarted.restarts == 3
    assert pgd_restarts(trained_cnn, EPS, 5, 2, loss="cw").name == "pgd_cw-5x2"
    with pytest.raises(ValueError, match="restarts"):
        pgd_restarts(trained_cnn, EPS, 5, 0)
