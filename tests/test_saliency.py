"""Each saliency method against an independent computation (captum or direct autograd) on
tiny models, plus the Grad-CAM++ bounding box of SAT's Eq. 10."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import GuidedBackprop, Saliency

from defenses.saliency import maps as saliency


class Tiny(nn.Module):
    """Two conv layers (ReLU modules, not in place: what captum's hooks need) + linear head."""

    attention_layer = "features"

    def __init__(self, relu=nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), relu(),
                                      nn.Conv2d(4, 6, 3, padding=1, stride=2), relu())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 5))

    def forward(self, x):
        return self.head(self.features(x))


class TinyFunctional(Tiny):
    """The same network calling F.relu (as the ResNets here do) instead of ReLU modules."""

    def forward(self, x):
        f = self.features
        h = F.relu(f[2](F.relu(f[0](x))))
        return self.head(h)


class LinearHead(nn.Module):
    """Attention activation A = ReLU(conv(x)), logits = W·vec(A) + b: ∂Φ_c/∂A = W_c exactly."""

    attention_layer = "act"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3, 4, 0])


def test_gradient_matches_captum_saliency(tiny, batch):
    x, y = batch
    expected = Saliency(tiny).attribute(x, target=y, abs=False)
    torch.testing.assert_close(saliency.gradient(tiny, x, y), expected)


def test_guided_backprop_matches_captum(tiny, batch):
    x, y = batch
    ours = saliency.guided_backprop(tiny, x, y)
    with pytest.warns(UserWarning):
        theirs = GuidedBackprop(tiny).attribute(x.clone(), target=y)
    torch.testing.assert_close(ours, theirs)
    # and it is not the vanilla gradient: the guided ReLUs really were in place
    assert not torch.allclose(ours, saliency.gradient(tiny, x, y))


def test_guided_backprop_matches_captum_on_small_cnn():
    from defenses.core import models

    torch.manual_seed(0)
    model = models.build("small_cnn", 10, 1).eval()   # in-place ReLU modules, BatchNorm
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    with pytest.warns(UserWarning):
        theirs = GuidedBackprop(model).attribute(x.clone(), target=y)
    torch.testing.assert_close(saliency.guided_backprop(model, x, y), theirs)


def test_guided_backprop_catches_functional_relu_and_cleans_up(tiny, batch):
    x, y = batch
    functional = TinyFunctional().eval()
    functional.load_state_dict(tiny.state_dict())
    torch.testing.assert_close(saliency.guided_backprop(functional, x, y),
                               saliency.guided_backprop(tiny, x, y))
    # after the call, ReLU is the ordinary one again
    torch.testing.assert_close(saliency.gradient(functional, x, y), saliency.gradient(tiny, x, y))


def test_guided_backprop_defaults_to_the_predicted_class(tiny, batch):
    x, _ = batch
    pred = tiny(x).argmax(1)
    torch.testing.assert_close(saliency.guided_backprop(tiny, x), saliency.guided_backprop(tiny, x, pred))


def test_smoothgrad_matches_direct_autograd(tiny, batch):
    x, y = batch
    samples, level = 5, 0.2
    ours = saliency.smoothgrad(tiny, x, y, samples=samples, noise_level=level,
                               generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    total = torch.zeros_like(x)
    for _ in range(samples):
        xn = (x + level * torch.randn(x.shape, generator=gen)).requires_grad_(True)
        tiny(xn).gather(1, y[:, None]).sum().backward()
        total += xn.grad
    torch.testing.assert_close(ours, total / samples)


def test_smoothgrad_without_noise_is_the_gradient(tiny, batch):
    x, y = batch
    torch.testing.assert_close(saliency.smoothgrad(tiny, x, y, samples=3, noise_level=0.0),
                               saliency.gradient(tiny, x, y))


def test_integrated_gradients_matches_a_riemann_sum_and_completeness(tiny, batch):
    x, y = batch
    ours = saliency.integrated_gradients(tiny, x, y, steps=64)
    n = 1000  # midpoint rule from the black image, by plain autograd, all nodes in one batch
    a = ((torch.arange(n) + 0.5) / n).view(n, 1, 1, 1, 1)
    xa = (a * x).reshape(-1, *x.shape[1:]).requires_grad_(True)
    tiny(xa).gather(1, y.repeat(n)[:, None]).sum().backward()
    mean_grad = xa.grad.view(n, *x.shape).mean(0)
    torch.testing.assert_close(ours, x * mean_grad, atol=2e-4, rtol=2e-2)
    with torch.no_grad():
        gap = tiny(x).gather(1, y[:, None]) - tiny(torch.zeros_like(x)).gather(1, y[:, None])
    torch.testing.assert_close(ours.sum((1, 2, 3)), gap.squeeze(1), atol=2e-3, rtol=2e-2)


def test_grad_cam_pp_matches_the_closed_form():
    torch.manual_seed(3)
    model = LinearHead().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        act = model.act(model.conv(x))                    # A: (N, K, h, w)
    g = model.fc.weight[y].detach().view(4, 3, 8, 8)      # ∂Φ_y/∂A, analytic
    denom = 2 * g ** 2 + act.sum((2, 3), keepdim=True) * g ** 3
    alpha = torch.where(denom != 0, g ** 2 / torch.where(denom != 0, denom, 1.0), 0.0)
    w = (alpha * g.clamp(min=0)).sum((2, 3), keepdim=True)
    expected = (w * act).sum(1).clamp(min=0)
    torch.testing.assert_close(saliency.grad_cam_pp(model, x, y), expected)


def test_grad_cam_pp_works_on_a_frozen_model(tiny, batch):
    x, y = batch
    tiny.requires_grad_(False)
    cam = saliency.grad_cam_pp(tiny, x, y)
    assert cam.shape == (6, 4, 4) and (cam >= 0).all() and cam.sum() > 0


def test_grad_cam_works_on_a_frozen_model_and_plain_inputs(tiny, batch):
    # the Grad-CAM detector and SAD's teachers call it on frozen models with plain tensors
    x, y = batch
    live = saliency.grad_cam(tiny, x, y)
    tiny.requires_grad_(False)
    torch.testing.assert_close(saliency.grad_cam(tiny, x.detach(), y), live)
    assert not x.requires_grad


def test_cam_box_is_the_rectangle_around_the_hot_pixels():
    cam = torch.zeros(3, 4, 4)
    cam[0, 1, 2] = 1.0                      # one hot cell
    cam[1, 0, 0], cam[1, 3, 1] = 1.0, 0.5   # two cells: the box spans both
    box = saliency.cam_box(cam, (4, 4), threshold=0.3)  # same size: no interpolation
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[1, 2] = True
    expected1 = torch.zeros(4, 4, dtype=torch.bool)
    expected1[0:4, 0:2] = True
    assert torch.equal(box[0], expected0) and torch.equal(box[1], expected1)
    assert not box[2].any()                 # an all-zero map has no box
    assert saliency.cam_box(cam, (16, 16)).shape == (3, 16, 16)


def test_grad_cam_pp_box_is_plus_minus_one_over_all_channels():
    torch.manual_seed(0)
    model = LinearHead().eval()
    x = torch.rand(5, 1, 8, 8).expand(5, 1, 8, 8)
    s = saliency.grad_cam_pp_box(model, x, torch.tensor([0, 1, 2, 3, 0]))
    assert s.shape == x.shape and set(s.unique().tolist()) <= {-1.0, 1.0}
    box = saliency.cam_box(saliency.grad_cam_pp(model, x, torch.tensor([0, 1, 2, 3, 0])), (8, 8))
    assert torch.equal(s[:, 0] > 0, box)


@pytest.mark.parametrize("call", [
    lambda m, x: saliency.smoothgrad(m, x, samples=0),
    lambda m, x: saliency.smoothgrad(m, x, noise_level=-0.1),
    lambda m, x: saliency.integrated_gradients(m, x, steps=0),
    lambda m, x: saliency.cam_box(torch.ones(1, 2, 2), (4, 4), threshold=0.0),
])
def test_bad_settings_raise(tiny, batch, call):
    with pytest.raises(ValueError):
        call(tiny, batch[0])
