"""APGD (defenses.attacks.apgd): the authors' schedule and losses, torchattacks' strength, and
early stopping that saves the broken points' steps without changing the result."""
import pytest
import torch

from defenses.attacks.apgd import APGD, checkpoints, dlr
from defenses.attacks.external import torchattacks
from defenses.evaluation.benchmark import make_attack

EPS = 0.1  # the 1-epoch standard CNN is partly robust here: a comparison that can fail


class Counting(torch.nn.Module):
    """The wrapped model, counting the images it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0
        self.eval()  # torchattacks gives a model back in the mode it found it in

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


def robust(model, adv, y):
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.test_x[:200], mnist.test_y[:200]


def test_checkpoints_follow_the_authors_schedule():
    # window 22 % of 100 steps, shrinking by 3 to at least 6: 22, 41, 57, 70, 80, 87, 93, 99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # 20 steps: window 4, shrinking by 1 to at least 1
    assert checkpoints(20) == [4, 7, 9, *range(10, 21)]


def test_dlr_matches_hand_computed_values():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 4.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    # row 0 is right: -(3 - 1) / (3 - 0); row 1 is wrong: -(0 - 4) / (4 - 1)
    assert torch.allclose(dlr(z, y, None), torch.tensor([-2 / 3, 4 / 3]))
    # targeted at class 2: -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)
    t = torch.tensor([2, 2])
    assert torch.allclose(dlr(z, y, t), torch.tensor([-3 / (3 - (0 - 1) / 2), 2 / (4 - 0.5)]))


@pytest.mark.parametrize("name,theirs", [
    ("apgd_ce-50", lambda m: torchattacks.APGD(m, norm="Linf", eps=EPS, steps=50, n_restarts=1,
                                               loss="ce", seed=0)),
    # the targeted one runs 3 targets of torchattacks' APGD-T (44 s): slow
    pytest.param("apgd_t-50x3", lambda m: torchattacks.APGDT(m, norm="Linf", eps=EPS, steps=50,
                                                             n_restarts=1, n_classes=4, seed=0),
                 marks=pytest.mark.slow),
])
def test_as_strong_as_torchattacks_for_fewer_model_passes(name, theirs, trained_cnn, batch):
    x, y = batch
    ours, other = Counting(trained_cnn), Counting(trained_cnn)
    adv = make_attack(name, ours, EPS)(x, y)
    ref = theirs(other)(x, y)
    assert float((adv - x).abs().max()) <= EPS + 1e-6 and 0 <= float(adv.min()) <= float(adv.max()) <= 1
    clean, a, b = robust(trained_cnn, x, y), robust(trained_cnn, adv, y), robust(trained_cnn, ref, y)
    assert 0.1 < b < clean - 0.1, "the case must leave some points robust and break others"
    assert a <= b + 0.03, (a, b)  # 6 of 200 points: restart noise, not a weaker attack
    assert ours.images < other.images, (ours.images, other.images)


def test_a_broken_point_stops_iterating(batch):
    """On a model every point of which is wrong from the start, no step is taken."""
    x, y = batch
    bias = torch.tensor([5.0] + [0.0] * 9)
    model = Counting(lambda t: t.flatten(1).sum(1, keepdim=True) * 0 + bias)  # always class 0
    adv = APGD(model, EPS, steps=100)(x, torch.ones_like(y))
    assert model.images == len(x)  # the random start's one pass
    assert float((adv - x).abs().max()) <= EPS + 1e-6


def test_early_stopping_keeps_the_unbroken_points_paths(trained_cnn, batch):
    """A point's iterates do not depend on which points share its batch: beside points that
    are broken at the start and leave, a point ends where it ends alone (same seed, and it is
    first in both batches, so it draws the same random start)."""
    x, y = batch[0][:12], batch[1][:12]
    with torch.no_grad():
        never = (trained_cnn(x[:4]).argmax(1) + 1) % 10  # labels the clean model never gives
    for i in range(len(x)):
        alone = APGD(trained_cnn, EPS, steps=30, seed=i)(x[i:i + 1], y[i:i + 1])[0]
        mixed = APGD(trained_cnn, EPS, steps=30, seed=i)(torch.cat([x[i:i + 1], x[:4]]),
                                                         torch.cat([y[i:i + 1], never]))[0]
        assert torch.allclose(mixed, alone, atol=1e-6), i


def test_targets_are_the_most_likely_wrong_classes(trained_cnn, batch):
    x, y = batch
    x, y = x[:100], y[:100]  # three targets run the first one's attack, then more: per example
    one, three = APGD(trained_cnn, EPS, 30, "dlr", targets=1), APGD(trained_cnn, EPS, 30, "dlr", targets=3)
    assert robust(trained_cnn, three(x, y), y) <= robust(trained_cnn, one(x, y), y)
    assert three.name == "apgd_t-30x3"
    with pytest.raises(ValueError, match="targeted DLR"):
        APGD(trained_cnn, EPS, 30, "ce", targets=3)
