import pytest
import torch

from defenses import attacks
from defenses.attacks import check_images, pgd

EPS = 0.3
# every registered attack kind, with a small budget so the registry-wide test stays fast
BUDGETS = {"fgsm": "fgsm", "pgd": "pgd-10", "pgd_cw": "pgd_cw-10", "mim": "mim-5", "cw": "cw-20",
           "deepfool": "deepfool-10", "square": "square-200", "autoattack": "autoattack",
           "apgd_ce": "apgd_ce-10", "apgd_dlr": "apgd_dlr-10", "apgd_t": "apgd_t-10x2",
           "fab_t": "fab_t-10x2"}


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.test_x[:64], mnist.test_y[:64]


def test_every_registered_attack_is_covered():
    assert set(BUDGETS) == set(attacks.names())


@pytest.mark.parametrize("kind", list(BUDGETS))
def test_attack_lowers_accuracy_stays_in_ball_and_restores_the_model(kind, trained_cnn, batch):
    x, y = batch
    if kind == "deepfool":  # torchattacks' DeepFool loops image by image: keep it tiny
        x, y = x[:4], y[:4]
    model = trained_cnn.train()  # attacks must put it in eval mode and give train mode back
    model.block1[1].eval()       # ... restoring each module's own mode, not a blanket train()
    grads_before = [p.grad for p in model.parameters()]
    attack = attacks.make(BUDGETS[kind], model, EPS)
    adv = attack(x, y)
    assert model.training and not model.block1[1].training
    assert all(p.requires_grad for p in model.parameters())
    assert [p.grad for p in model.parameters()] == grads_before  # nothing accumulated
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0
    model.eval()
    if kind == "deepfool":
        # torchattacks 3.5.1's DeepFool clips every step to [0,1] and often stalls on MNIST
        # (seen: 45 % success at 50 steps); it must move the images and never help the model.
        assert not torch.equal(adv, x) and accuracy(model, adv, y) <= accuracy(model, x, y)
    else:
        assert accuracy(model, adv, y) < accuracy(model, x, y)


def test_stronger_eps_never_raises_accuracy(trained_cnn, batch):
    x, y = batch
    accs = []
    for eps in (0.0, 0.05, 0.1, 0.2, 0.3):
        torch.manual_seed(0)
        accs.append(accuracy(trained_cnn, pgd(trained_cnn, x, y, eps, 2.5 * eps / 20 + 1e-12, 20), y))
    assert accs == sorted(accs, reverse=True), accs
    assert accs[0] > 0.9 and accs[-1] < 0.1


def test_pgd_is_deterministic_with_a_generator(trained_cnn, batch):
    x, y = batch
    a = pgd(trained_cnn, x, y, EPS, 0.03, 5, generator=torch.Generator().manual_seed(3))
    b = pgd(trained_cnn, x, y, EPS, 0.03, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_pgd_takes_any_callable(trained_cnn, batch):
    x, y = batch
    adv = pgd(lambda t: trained_cnn(t), x, y, EPS, 0.03, 5)
    assert accuracy(trained_cnn, adv, y) < accuracy(trained_cnn, x, y)


def test_images_outside_unit_range_are_refused():
    with pytest.raises(ValueError, match="double normalization"):
        check_images(torch.randn(2, 1, 4, 4) * 3)


def test_unknown_attack_names_the_valid_ones():
    with pytest.raises(attacks.AttackNameError, match="pgd"):
        attacks.parse("bim-5")
    assert attacks.parse("pgd-40") == ("pgd", 40, None)
    assert attacks.parse("apgd_t-50x3") == ("apgd_t", 50, 3)


@pytest.mark.parametrize("dtype", [
    torch.bfloat16,
    # fp16 autocast on a CPU is emulated (15 s here, 1 s for bf16); the GPU path it stands for
    # is checked by fp16 loss scaling's own test (test_fp16_attack_gradients_are_not_zeroed_by_underflow)
    pytest.param(torch.float16, marks=pytest.mark.slow),
])
def test_pgd_under_autocast_matches_full_precision_strength(trained_cnn, batch, dtype):
    # The training attacks' low-precision option: the passes run in bf16/fp16, δ and the
    # projection stay fp32, and the attack is about as strong as in full precision.
    x, y = batch
    eps = 0.1  # where a one-epoch model is partly robust, so strength differences show
    full = pgd(trained_cnn, x, y, eps, 2.5 * eps / 10, 10, generator=torch.Generator().manual_seed(0))
    low = pgd(trained_cnn, x, y, eps, 2.5 * eps / 10, 10, generator=torch.Generator().manual_seed(0),
              autocast=dtype)
    assert low.dtype == torch.float32
    assert float((low - x).abs().max()) <= eps + 1e-6 and 0.0 <= float(low.min()) and float(low.max()) <= 1.0
    assert accuracy(trained_cnn, low, y) < accuracy(trained_cnn, x, y) - 0.2
    assert abs(accuracy(trained_cnn, low, y) - accuracy(trained_cnn, full, y)) <= 3 / 64


def test_threat_model_refuses_an_unknown_precision():
    from defenses.core.base import ThreatModel

    with pytest.raises(ValueError, match="valid: fp32, bf16, fp16"):
        ThreatModel(eps=0.3, train_precision="fp8")
    assert ThreatModel(eps=0.3, train_precision="bf16").attack_dtype == torch.bfloat16


@pytest.mark.parametrize("specs, steps", [
    (["fgsm"], 20), (["fast"], 20), (["standard"], 100), (["reduced"], 50),
    (["fgsm", "pgd-40", "apgd_t-50x3"], 50), (["cw-70", "square-5000"], 70), (["paper"], 20)])
def test_one_budget_rule_for_every_defense_s_adaptive_attacks(specs, steps):
    # SAD's adaptive PGD and the detectors' detector-aware attacks read the same rule
    from defenses.core import models
    from defenses.core.base import ThreatModel
    from defenses.feature_squeezing import FeatureSqueezing
    from defenses.sad import SAD

    assert attacks.strongest_steps(specs) == steps
    threat = ThreatModel(0.3, attacks=tuple(specs))
    sad = SAD(models.build("small_cnn", 10, 1), SAD.make_params({}), threat)
    fs = FeatureSqueezing(models.build("small_cnn", 10, 1), FeatureSqueezing.make_params({}), threat)
    assert sad.adaptive_steps() == fs.adaptive_budget() == steps


def test_random_starts_draw_on_the_generator_s_device_and_land_on_the_input_s():
    # a CPU generator with CUDA inputs (the benches pass one) must not raise; on the meta
    # device, which has no generator of its own, the draw must come from the CPU generator
    from defenses.attacks.base import uniform_like
    from defenses.attacks.pgd import random_start

    x = torch.zeros(2, 1, 4, 4, device="meta")
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state().clone()
    assert uniform_like(x, gen).device.type == "meta"
    assert not torch.equal(gen.get_state(), before)  # drawn from this generator
    cpu = torch.full((2, 1, 4, 4), 0.5)
    a = random_start(cpu, 0.1, torch.Generator().manual_seed(3))
    b = random_start(cpu, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.abs().max() <= 0.1 + 1e-7 and a.abs().max() > 0


def test_fp16_attack_gradients_are_not_zeroed_by_underflow(trained_cnn, batch):
    # TRADES' first step: KL between f(x) and f(x + 0.001·noise), gradients ~1e-6 per pixel,
    # below what an fp16 backward pass keeps. Unscaled, whole examples get a zero gradient
    # (their pixels would not move); through input_gradient none does, in the same direction.
    import torch.nn.functional as F

    from defenses.attacks.base import autocast_passes, input_gradient

    x, _ = batch
    torch.manual_seed(0)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)

    def kl(dtype):
        with autocast_passes(x, dtype):
            clean, adv = trained_cnn(x).float(), trained_cnn(x_adv).float()
        return F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1).detach(), reduction="sum")

    def zero_examples(grad):
        return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()

    raw, = torch.autograd.grad(kl(torch.float16), x_adv)
    scaled = input_gradient(kl(torch.float16), x_adv, torch.float16)
    full = input_gradient(kl(None), x_adv, None)
    assert zero_examples(raw) > 0.2, zero_examples(raw)  # the case shows the underflow
    assert zero_examples(scaled) == 0 and zero_examples(full) == 0
    # mostly the fp32 direction, weighted by gradient mass (a random sign would give 0.5): the
    # fp16 forward of two nearly equal inputs is itself rounded, scaled or not, and CPUs round
    # fp16 their own way (measured 0.91 on an AVX-512 CPU, 0.81 on an AVX2-only one)
    agree = ((scaled.sign() == full.sign()) * full.abs()).sum() / full.abs().sum()
    assert agree > 0.75, agree
