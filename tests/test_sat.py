"""SAT (defenses/sat.py): Eq. 9 statistics, the ε₀/[0,1] bound, saliency caching across epochs
and trials, the PGD/TRADES variants, bad input, and one end-to-end trial."""
import dataclasses
import math

import pytest
import torch

from defenses.core import data as data_lib
from defenses.core import models
from defenses.saliency import maps as saliency
from defenses import sat as sat_lib
from defenses.core.base import BaseModelRequest, DefenseConfigError, ThreatModel
from defenses.sat import SAT, SATParams, sat_examples, saliency_noise

THREAT = ThreatModel(eps=0.3, train_steps=2)


# --- Eq. 9 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,epoch", [(0.95, 1), (0.95, 10), (0.6, 3), (0.3, 2)])
def test_fraction_of_random_entries_matches_alpha_power(alpha, epoch):
    n = 200_000
    s = torch.zeros(n)  # −s = 0, so exactly the random entries are nonzero
    delta = saliency_noise(s, alpha, epoch, generator=torch.Generator().manual_seed(0))
    p = alpha ** epoch
    random = delta != 0
    assert abs(random.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert set(delta[random].unique().tolist()) == {-1.0, 1.0}
    k = int(random.sum())
    assert abs(delta[random].mean().item()) < 4 / math.sqrt(k)  # fair signs


def test_alpha_to_zero_gives_minus_s_exactly():
    s = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for alpha in (0.0, 1e-12):
        for epoch in (1, 5):
            delta = saliency_noise(s, alpha, epoch, generator=torch.Generator().manual_seed(2))
            assert torch.equal(delta, -s)


def test_epoch_zero_and_alpha_one_are_all_random():
    s = torch.full((10_000,), 0.5)
    assert set(saliency_noise(s, 0.9, 0).unique().tolist()) == {-1.0, 1.0}
    assert set(saliency_noise(s, 1.0, 7).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("bad", [dict(alpha=-0.1, epoch=1), dict(alpha=1.5, epoch=1),
                                 dict(alpha=0.5, epoch=-1)])
def test_saliency_noise_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        saliency_noise(torch.zeros(3), **bad)


@pytest.mark.parametrize("normalization", ["sign", "max_abs"])
def test_perturbation_within_eps0_and_unit_interval(normalization):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 28, 28, generator=gen)
    x[:, :, :5] = 0.0   # boundary pixels: clipping must hold them in [0,1]
    x[:, :, -5:] = 1.0
    raw = torch.randn(16, 1, 28, 28, generator=gen) * 7
    s = sat_lib.normalize_maps(raw, normalization)
    assert float(s.abs().max()) <= 1.0
    for alpha, epoch, eps0 in [(0.95, 1, 0.3), (0.1, 4, 0.3), (0.5, 2, 8 / 255), (0.0, 1, 0.45)]:
        adv = sat_examples(x, s, alpha, epoch, eps0, generator=gen)
        assert float((adv - x).abs().max()) <= eps0 + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_normalizations():
    m = torch.tensor([[[[3.0, -1.5, 0.0, 0.75]]], [[[0.0, 0.0, 0.0, 0.0]]]])
    assert torch.equal(sat_lib.normalize_maps(m, "sign")[0].flatten(), torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert torch.equal(sat_lib.normalize_maps(m, "max_abs")[0].flatten(), torch.tensor([1.0, -0.5, 0.0, 0.25]))
    assert torch.equal(sat_lib.normalize_maps(m, "max_abs")[1], torch.zeros_like(m[1]))


# --- configuration -------------------------------------------------------------------------
def test_registered_with_its_search_space():
    from defenses.core import registry
    from search_spaces import sat as space

    assert registry.get("sat") is SAT
    assert {"alpha", "eps0", "teacher", "method", "variant"} <= set(space.SPACE)
    assert SATParams().alpha == pytest.approx(0.6 ** 0.1)


@pytest.mark.parametrize("hp,words", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": -0.2}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"alpha": "high"}, "alpha"), ({"eps0": -0.01}, "eps0"),
    ({"teacher": "robust"}, "valid: standard, pgd_at"),
    ({"method": "lime"}, "valid: gradient, guided_backprop, smoothgrad, integrated_gradients, grad_cam_pp_box"),
    ({"variant": "free"}, "valid: sat, pgd_sat, trades_sat"), ({"normalization": "l2"}, "valid: sign"),
    ({"beta": -1.0}, "beta"), ({"gamma": 1.0}, "no hyperparameter"),
])
def test_bad_hyperparameters_give_one_clear_line(hp, words):
    with pytest.raises(DefenseConfigError) as e:
        SAT.make_params(hp)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_search_space_stops_the_spec_before_ray():
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match="alpha"):
        parse({"defenses": {"sat": {"space": {"alpha": {"low": 0.5, "high": 1.0}}}}})
    with pytest.raises(SpecError, match="valid: standard, pgd_at"):
        parse({"defenses": {"sat": {"space": {"teacher": ["standard", "trades"]}}}})
    parse({"defenses": ["sat"]})  # the default space is valid


@pytest.mark.parametrize("teacher", ["standard", "pgd_at"])
def test_base_model_is_the_teacher(teacher):
    assert SAT.base_model(SAT.make_params({"teacher": teacher})) == BaseModelRequest(defense=teacher)


# --- teacher checkpoints and cached maps ---------------------------------------------------
@pytest.fixture
def small(mnist):
    return dataclasses.replace(mnist, train_x=mnist.train_x[:32], train_y=mnist.train_y[:32])


def save_teacher(folder, dataset="mnist5k", model="small_cnn", defense="standard", seed=0):
    torch.manual_seed(seed)
    net = models.build(model, 10, 1)
    meta = {"dataset": dataset, "model": model, "defense": defense, "num_classes": 10,
            "in_channels": 1, "seed": seed, "hp": {}}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "meta": meta}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt", net.eval()


def make_sat(**hp):
    torch.manual_seed(0)
    hp = {"teacher": "standard", "eps0": 0.3, "alpha": 0.5, **hp}
    return SAT(models.build("small_cnn", 10, 1), SAT.make_params(hp), THREAT)


@pytest.fixture
def counting(monkeypatch):
    calls = []
    original = sat_lib.METHODS["guided_backprop"]

    def counted(model, x, target, **kw):
        calls.append(len(x))
        return original(model, x, target, **kw)

    monkeypatch.setitem(sat_lib.METHODS, "guided_backprop", counted)
    return calls


def run_epochs(defense, data, epochs):
    opt = torch.optim.Adam(defense.model.parameters(), 1e-3)
    for epoch in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(epoch)
        batches = data_lib.batches(data.train_x, data.train_y, 16, shuffle=True, generator=gen)
        metrics = defense.train_epoch(batches, opt, epoch)
        assert math.isfinite(metrics["loss"])
        assert metrics["sat_random_prob"] == pytest.approx(defense.params.alpha ** epoch)


def test_maps_are_cached_across_epochs_and_trials(tmp_path, small, counting):
    ckpt, teacher = save_teacher(tmp_path / "teacher")
    first = make_sat()
    first.setup(small, ckpt)
    assert sum(counting) == 32                      # every training image once
    run_epochs(first, small, 3)
    assert sum(counting) == 32                      # epochs reuse them: nothing recomputed
    cached = list(ckpt.parent.glob("sat-saliency-guided_backprop-*.pt"))
    assert len(cached) == 1                         # stored next to the teacher checkpoint
    second = make_sat(alpha=0.9)                    # another trial, same teacher and data
    second.setup(small, ckpt)
    assert sum(counting) == 32 and second.saliency_seconds == 0.0
    assert torch.equal(first.maps, second.maps)
    # the maps are the teacher's, for the ground-truth class, sign-normalized
    expected = torch.sign(saliency.guided_backprop(teacher, small.train_x, small.train_y))
    assert torch.equal(first.maps.float(), expected)
    # another training set is another cache entry
    other = dataclasses.replace(small, train_x=small.train_x[:16], train_y=small.train_y[:16])
    make_sat().setup(other, ckpt)
    assert sum(counting) == 32 + 16
    assert len(list(ckpt.parent.glob("sat-saliency-guided_backprop-*.pt"))) == 2


def test_a_retrained_teacher_does_not_reuse_stale_maps(tmp_path, small, counting):
    ckpt, _ = save_teacher(tmp_path / "teacher", seed=0)
    make_sat().setup(small, ckpt)
    save_teacher(tmp_path / "teacher", seed=1)      # same path, other weights
    make_sat().setup(small, ckpt)
    assert sum(counting) == 64


def test_each_batch_gets_the_map_of_its_own_images(tmp_path, small):
    ckpt, _ = save_teacher(tmp_path / "teacher")
    defense = make_sat()
    defense.setup(small, ckpt)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(5))[:20]
    got = defense.saliency_for(small.train_x[order], small.train_y[order])
    assert torch.equal(got, defense.maps[order].float())
    foreign = small.train_x[order].clone()
    foreign[0, 0, 0, 0] = 0.5 if foreign[0, 0, 0, 0] != 0.5 else 0.25
    with pytest.raises(RuntimeError, match="not in the training set"):
        defense.saliency_for(foreign, small.train_y[order])


def test_index_finds_uint8_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (50,), generator=gen)
    index = sat_lib.TrainingSetIndex(x, y, torch.device("cpu"))
    bx, by = next(data_lib.batches(x, y, 20, shuffle=True, generator=gen))
    found = index(bx, by)
    assert torch.equal(data_lib.as_float(x[found]), bx) and torch.equal(y[found], by)


@pytest.mark.parametrize("change,words", [
    (dict(dataset="cifar10"), "cifar10"),
    (dict(model="preact_resnet18"), "PreActResNet18"),
    (dict(defense="pgd_at"), "'pgd_at'"),
])
def test_incompatible_teacher_checkpoint_is_a_clear_error(tmp_path, small, change, words):
    ckpt, _ = save_teacher(tmp_path / "teacher", **change)
    with pytest.raises(DefenseConfigError, match=words) as e:
        make_sat().setup(small, ckpt)
    assert "\n" not in str(e.value)


def test_setup_without_a_teacher_is_a_clear_error(small):
    with pytest.raises(DefenseConfigError, match="teacher checkpoint"):
        make_sat().setup(small, None)


# --- variants ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant,attack", [("pgd_sat", "pgd"), ("trades_sat", "kl_adversarial")])
def test_half_of_each_batch_is_attacked(tmp_path, small, monkeypatch, variant, attack):
    ckpt, _ = save_teacher(tmp_path / "teacher")
    seen = []
    original = getattr(sat_lib, attack)

    def spy(model, x, *args, **kw):
        seen.append(len(x))
        return original(model, x, *args, **kw)

    monkeypatch.setattr(sat_lib, attack, spy)
    defense = make_sat(variant=variant)
    defense.setup(small, ckpt)
    run_epochs(defense, small, 1)
    assert seen == [8, 8]  # two batches of 16, half of each


def test_sat_variant_calls_no_attack(tmp_path, small, monkeypatch):
    ckpt, _ = save_teacher(tmp_path / "teacher")
    monkeypatch.setattr(sat_lib, "pgd", lambda *a, **k: pytest.fail("SAT must not run PGD"))
    monkeypatch.setattr(sat_lib, "kl_adversarial", lambda *a, **k: pytest.fail("no TRADES attack"))
    defense = make_sat()
    defense.setup(small, ckpt)
    run_epochs(defense, small, 1)


# --- end to end ----------------------------------------------------------------------------
def test_run_trial_end_to_end_reuses_the_teachers_maps(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trial import LocalReporter, run_trial

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 100,
                  "eval_samples": 40, "batch_size": 50,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2},
                  "defenses": ["sat"]})
    seconds = []
    for variant in ("sat", "pgd_sat"):
        reporter = LocalReporter(tmp_path / variant)
        rec = run_trial({"defense": "sat", "spec": spec, "run_dir": str(tmp_path),
                         "hp": {"teacher": "standard", "method": "gradient", "variant": variant,
                                "eps0": 0.2, "alpha": 0.8}}, reporter)
        assert rec.status == "completed", rec.error
        assert 0.0 <= rec.robust_acc <= rec.clean_acc <= 1.0 and "fgsm" in rec.acc
        seconds.append(reporter.results[0]["saliency_seconds"])
    assert seconds[0] > 0 and seconds[1] == 0.0  # the second trial loaded the cached maps
    assert len(list((tmp_path / "bases").glob("*/sat-saliency-gradient-sign-*.pt"))) == 1
