"""defenses.evaluation.benchmark: presets, attack names, the cascade, robustness curves and their columns,
and how they reach the sweep's CSVs (records, spec, aggregate/export)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from defenses.evaluation import benchmark as ev
from defenses.attacks import PGD
from defenses.core.base import Defense, Prediction, ThreatModel
from orchestrator import export
from orchestrator.aggregate import curve_columns, fronts_by_eps, parse_eps_label, pareto_front
from orchestrator.records import TrialRecord
from orchestrator.spec import SpecError, parse

EPS = 0.3


class Plain(Defense):
    """A differentiable classifier; ``extra`` stands for a defense's own adaptive attacks."""

    name = "plain_test"

    def __init__(self, model, extra=None, paper=None):
        super().__init__(model, None, ThreatModel(eps=EPS))
        self.extra = extra or (lambda eps: [])
        if paper is not None:
            self.paper_attacks = paper

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        return {}

    def adaptive_attacks(self, eps):
        return self.extra(eps)


@pytest.fixture(scope="module")
def data(mnist):
    return mnist.test_x[:60], mnist.test_y[:60]


def names(attacks):
    return [a.name for a in attacks]


# ------------------------------------------------------------------ presets and names

def test_presets_expand_to_their_attacks(linear):
    d = Plain(linear)
    assert names(ev.build_attacks(["fast"], d, EPS, adaptive=False)) == [
        "fgsm", "apgd_ce-20", "apgd_t-20x3"]
    assert names(ev.build_attacks(["reduced"], d, EPS, adaptive=False)) == [
        "apgd_ce-50", "apgd_t-50x3", "fab_t-50x3", "square-1000"]
    assert names(ev.build_attacks(["standard"], d, EPS, adaptive=False)) == [
        "apgd_ce-100", "apgd_t-100", "fab_t-100", "square-5000"]
    # a plain classifier's adaptive attack is strong white-box PGD on it
    assert names(ev.build_attacks(["adaptive"], d, EPS)) == ["pgd-40", "pgd_cw-40"]
    own = Plain(linear, extra=lambda eps: [PGD(linear, eps, steps=3)])
    assert names(ev.build_attacks(["adaptive"], own, EPS)) == ["pgd-3"]
    # the defense's adaptive attacks are appended once, even when the preset names them too
    assert names(ev.build_attacks(["fgsm", "adaptive"], own, EPS, adaptive=True)) == ["fgsm", "pgd-3"]


class WithPaper(Plain):
    name = "with_paper_test"

    def paper_attacks(self, eps):
        return ["mim-10", PGD(self.model, eps, steps=7, loss="cw")]


def test_paper_preset_uses_the_defense_setting_or_is_an_error(linear):
    with pytest.raises(ev.EvalConfigError) as err:
        ev.build_attacks(["paper"], Plain(linear), EPS, False)
    message = str(err.value)
    assert "\n" not in message and "'plain_test'" in message
    usable = ", ".join(p for p in ev.PRESETS if p != "paper")
    assert "no paper setting" in message and f"use the presets {usable} or attack names" in message
    as_method = Plain(linear, paper=lambda eps: ["pgd-5", PGD(linear, eps, steps=7, loss="cw")])
    assert names(ev.build_attacks(["paper"], as_method, EPS, False)) == ["pgd-5", "pgd_cw-7"]
    assert names(ev.build_attacks(["fgsm", "paper"], WithPaper(linear), EPS, False)) == [
        "fgsm", "mim-10", "pgd_cw-7"]
    with pytest.raises(ev.EvalConfigError, match="may not name the 'paper' preset"):
        ev.build_attacks(["paper"], Plain(linear, paper=lambda eps: ["paper"]), EPS, False)


def test_check_paper_decides_from_the_class_alone():
    ev.check_paper(Plain, ["fast", "pgd-40"])  # no 'paper' asked for: nothing to check
    ev.check_paper(WithPaper, ["paper"])
    with pytest.raises(ev.EvalConfigError) as err:
        ev.check_paper(Plain, ["fgsm", "paper"])
    usable = ", ".join(p for p in ev.PRESETS if p != "paper")
    assert str(err.value) == ("preset 'paper': defense 'plain_test' defines no paper setting "
                              f"(paper_attacks); use the presets {usable} or attack names")
    assert "fast" in usable and "adaptive" in usable


def test_every_registered_defense_but_standard_has_a_paper_setting():
    from defenses.core import models, registry

    without = []
    for name in registry.names():
        cls = registry.get(name)
        try:
            ev.check_paper(cls, ["paper"])
        except ev.EvalConfigError:
            without.append(name)
            continue
        defense = cls(models.build("small_cnn", 10, 1), cls.make_params({}), ThreatModel(eps=EPS))
        built = ev.build_attacks(["paper"], defense, EPS, adaptive=False)
        assert built and all(abs(a.eps - EPS) < 1e-12 for a in built), name
    assert without == ["standard"]
    pgd_at = registry.get("pgd_at")
    d = pgd_at(models.build("small_cnn", 10, 1), pgd_at.make_params({}), ThreatModel(eps=EPS))
    assert names(ev.build_attacks(["paper"], d, EPS, False)) == [
        "fgsm", "pgd-40", "pgd-100", "pgd-40x20", "pgd-100x20", "pgd_cw-40"]


def test_budgets_and_target_counts_are_spelled_in_the_name(linear):
    built = ev.build_attacks(["apgd_t-20x3", "fab_t-10", "apgd_dlr-5"], Plain(linear), EPS, False)
    assert names(built) == ["apgd_t-20x3", "fab_t-10", "apgd_dlr-5"]
    assert ev.parse_attack("apgd_t-50x3") == ("apgd_t", 50, 3)
    assert ev.parse_attack("pgd-40") == ("pgd", 40, None)


@pytest.mark.parametrize("bad,match", [
    ("bogus", "unknown attack or preset 'bogus'; valid attacks: .*apgd_t.*valid presets: fast, "
              "standard, reduced, adaptive, paper"),
    ("pgd-0", "must be positive"),
    ("apgd_ce-10x3", "only apgd_t, fab_t take a target count"),
    ("pgd-10x2", "only apgd_t, fab_t take a target count"),
])
def test_bad_attack_names_say_what_is_valid(bad, match):
    with pytest.raises(ev.EvalConfigError, match=match):
        ev.check_attacks([bad])


def test_threat_models_the_attacks_do_not_support_are_refused():
    with pytest.raises(ev.EvalConfigError, match="does not support the L2 threat model; it supports: Linf"):
        ev.check_attacks(["pgd-20"], norm="L2")
    with pytest.raises(ev.EvalConfigError, match="unknown norm 'L3'"):
        ev.check_attacks(["pgd-20"], norm="L3")


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_eps_outside_unit_interval_is_refused(linear, data, eps):
    with pytest.raises(ev.EvalConfigError, match="outside \\[0,1\\]"):
        ev.benchmark(Plain(linear), *data, eps, ["fgsm"])
    with pytest.raises(ev.EvalConfigError, match="outside \\[0,1\\]"):
        ev.EvalSpec(eps=(0.1, eps))


def test_eps_labels_round_trip():
    for eps, label in [(0.3, "0.3"), (0.1, "0.1"), (0.5, "0.5"), (8 / 255, "8/255"),
                       (2 / 255, "2/255"), (64 / 255, "64/255"), (0.0123456, "0.01235")]:
        assert ev.eps_label(eps) == label
        assert ev.parse_eps(label) == pytest.approx(eps, rel=1e-3)
        assert parse_eps_label(label) == pytest.approx(eps, rel=1e-3)


def test_default_curves_put_the_primary_eps_first():
    assert ev.default_eval_eps("mnist5k", 0.3) == (0.3, 0.1, 0.2)
    assert ev.default_eval_eps("cifar10", 8 / 255) == pytest.approx((8 / 255, 2 / 255, 4 / 255))
    assert ev.default_eval_eps("mnist5k", 0.25) == (0.25, 0.1, 0.2, 0.3)
    spec = ev.EvalSpec.for_dataset("cifar10", 8 / 255)
    assert spec.masking.large_eps == pytest.approx(64 / 255)
    assert ev.EvalSpec.for_dataset("mnist5k", 0.3, masking_samples=0).masking is None


# ------------------------------------------------------------------ the cascade

def test_benchmark_cascade_and_backward_compatible_signature(linear, data):
    r = ev.benchmark(Plain(linear), *data, EPS, ["fgsm", "pgd-10"], 256, True)
    assert list(r.acc) == ["fgsm", "pgd-10"] and r.robust_attack == "fgsm+pgd-10"
    assert r.clean_acc >= r.acc["fgsm"] >= r.acc["pgd-10"] == r.robust_acc
    assert r.robust_mask.dtype == torch.bool and r.robust_mask.sum() == round(r.robust_acc * r.n)
    assert sum(r.broken_by.values()) == round((r.clean_acc - r.robust_acc) * r.n)


def test_points_an_earlier_evaluation_broke_count_and_are_not_attacked_again(linear, data):
    """The final evaluation starts from the search's evidence, as a cascade does: a point
    broken before stays broken (even against an attack that breaks nothing) and is not
    attacked again; only the first len(known) inputs are covered."""
    class Identity(ev.Attack):
        name = "identity"

        def forward(self, images, labels):
            seen.append(len(images))
            return images

    seen: list[int] = []
    x, y = data
    clean = ev.benchmark(Plain(linear), x, y, EPS, [Identity(linear, EPS)], adaptive=False)
    known = torch.zeros(40, dtype=torch.bool)
    known[:20] = True  # "broken earlier": the first 20 (the clean-wrong among them change nothing)
    seen.clear()
    r = ev.benchmark(Plain(linear), x, y, EPS, [Identity(linear, EPS)], adaptive=False, known=known)
    earlier = int(clean.robust_mask[:20].sum())
    assert r.broken_by[ev.EARLIER] == earlier > 0 and r.robust_attack == "identity+earlier"
    assert r.robust_acc == pytest.approx(clean.robust_acc - earlier / len(y))
    assert r.clean_acc == clean.clean_acc and sum(seen) == int(r.robust_mask.sum())
    assert not r.robust_mask[:20].any()
    # a Report hands its not-robust points to the next evaluation
    report = ev.Report({EPS: r}, {}, {}, 0.0)
    assert torch.equal(report.broken()[EPS], ~r.robust_mask)


def test_autoattack_components_break_an_undefended_model(linear, data):
    x, y = data[0][:20], data[1][:20]
    r = ev.benchmark(Plain(linear), x, y, EPS, ["apgd_ce-5", "apgd_t-5x2", "fab_t-5x2", "square-50"],
                     adaptive=False)
    assert r.clean_acc > 0.6 and r.robust_acc == 0.0


def test_a_rejected_adversarial_counts_as_defended(linear, data):
    class RejectAll(Plain):
        def predict(self, x):
            return Prediction(self.model(x), torch.ones(len(x), dtype=torch.bool))

    r = ev.benchmark(RejectAll(linear), *data, EPS, ["fgsm"])
    assert r.clean_acc == 0.0 and r.clean_rejected == 1.0


# ------------------------------------------------------------------ curves and their columns

def test_evaluate_runs_every_eps_and_names_the_columns(linear, data):
    spec = ev.EvalSpec.for_dataset("mnist5k", EPS, [0.1], masking_samples=0, attacks=("fast",),
                                   curve_samples=30)
    report = ev.evaluate(Plain(linear), data, spec)
    assert list(report.results) == [0.3, 0.1] and report.primary.eps == 0.3
    assert report.results[0.3].n == 60 and report.results[0.1].n == 30
    cols = report.curve_columns()
    assert set(cols) == {"robust_acc@0.3", "n_eval@0.3", *(f"acc.{a}@0.3" for a in ev.FAST),
                         "robust_acc@0.1", "n_eval@0.1", *(f"acc.{a}@0.1" for a in ev.FAST)}
    assert cols["n_eval@0.3"] == 60 and cols["n_eval@0.1"] == 30
    assert cols["robust_acc@0.1"] >= cols["robust_acc@0.3"]
    assert report.flags == {}


def test_record_row_has_curve_columns_and_keeps_the_old_ones():
    rec = TrialRecord("t", "pgd_at", "mnist5k", "small_cnn", 0, acc={"pgd-20": 0.5},
                      curve={"robust_acc@0.1": 0.8, "acc.pgd-20@0.1": 0.8},
                      flags={"zero_gradients": False}, metrics={"masking.eps_rise": 0.0})
    row = rec.to_row()
    assert {"acc.pgd-20", "robust_acc@0.1", "acc.pgd-20@0.1", "flag.zero_gradients",
            "metric.masking.eps_rise", "robust_acc", "clean_acc"} <= set(row)
    assert TrialRecord.from_dict(rec.to_dict()) == rec


def test_spec_takes_presets_curves_and_final_eval():
    base = {"defenses": ["standard"]}
    t = parse({**base, "threat_model": {"attacks": ["fast", "apgd_t-20x3"], "eval_eps": [0.1, 0.2],
                                        "final_eval": ["standard"], "exclude_flagged": True}}).threat_model
    assert t.attacks == ["fast", "apgd_t-20x3"] and t.final_eval == ["standard"] and t.exclude_flagged
    with pytest.raises(SpecError, match="threat_model.final_eval: unknown attack or preset 'strong'"):
        parse({**base, "threat_model": {"final_eval": ["strong"]}})
    with pytest.raises(SpecError, match="eval_eps=1.5 outside"):
        parse({**base, "threat_model": {"eval_eps": [0.1, 1.5]}})


# ------------------------------------------------------------------ fronts per ε, plot panels

def curve_trials(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        clean = rng.integers(4, 9) / 8
        curve = np.sort(rng.integers(0, 9, 3) / 8)[::-1] * clean
        rows.append(TrialRecord(
            f"t{i:02d}", str(rng.choice(["pgd_at", "sad"])), "mnist5k", "small_cnn", 0,
            status="completed", clean_acc=clean, robust_acc=float(curve[2]),
            acc={"pgd-20": float(curve[2])}, flags={"zero_gradients": bool(rng.random() < 0.2)},
            curve={"robust_acc@0.1": float(curve[0]), "robust_acc@0.2": float(curve[1]),
                   "robust_acc@0.3": float(curve[2])}).to_row())
    return pd.DataFrame(rows)


@pytest.mark.parametrize("exclude_flagged", [False, True])
def test_pareto_by_eps_holds_one_front_per_eps(tmp_path, exclude_flagged):
    df = curve_trials(0)
    paths = export.export_all(df, tmp_path, exclude_flagged=exclude_flagged)
    by_eps = pd.read_csv(paths["pareto_by_eps.csv"])
    assert sorted(by_eps["eps"].unique()) == pytest.approx([0.1, 0.2, 0.3])
    for eps, col in curve_columns(df):
        part = by_eps[np.isclose(by_eps["eps"], eps)]
        front = pareto_front(df, ("clean_acc", col), exclude_flagged=exclude_flagged)
        assert set(part["trial_id"]) == set(front["trial_id"])
        assert (part["robust_acc_at_eps"] == part[col]).all() and part["is_knee"].sum() == 1
        if exclude_flagged:
            assert not part["suspect"].astype("string").fillna("").str.len().any()
    pareto = pd.read_csv(paths["pareto.csv"])  # the primary front keeps its suspects, named
    front = pareto_front(df, exclude_flagged=exclude_flagged)
    assert set(pareto["trial_id"]) == set(front["trial_id"])
    flagged = pareto[pareto["flag.zero_gradients"]]
    assert (flagged["suspect"] == "zero_gradients").all()


def test_plot_has_one_panel_per_eps(tmp_path, monkeypatch):
    shapes = []
    real = export.Figure.subplots
    monkeypatch.setattr(export.Figure, "subplots",
                        lambda self, *a, **k: shapes.append(a) or real(self, *a, **k))
    export.export_all(curve_trials(1), tmp_path)
    export.export_all(curve_trials(1).drop(columns=[c for _, c in curve_columns(curve_trials(1))]),
                      tmp_path / "plain")
    assert shapes == [(1, 3), (1, 1)]
    assert not (tmp_path / "plain" / "pareto_by_eps.csv").exists()


def test_fronts_by_eps_swap_in_each_curve_column():
    fronts = fronts_by_eps(curve_trials(2))
    assert [objs for objs, _ in fronts.values()] == [
        ("clean_acc", "robust_acc@0.1"), ("clean_acc", "robust_acc@0.2"), ("clean_acc", "robust_acc@0.3")]


def test_evaluation_runs_with_deterministic_cudnn_and_gives_the_flags_back():
    # shrinking cascade subsets: no autotuning per shape, and deterministic kernels so that an
    # input-gradient prediction cannot flip a near-tie label between two runs (GPU only)
    import torch.nn as nn

    from defenses.core.base import cudnn_mode

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
            return super().forward(x.flatten(1))

    class Plain(Defense):
        name = "probe"

        def train_epoch(self, batches, optimizer, epoch, scheduler=None):
            return {}

    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    with cudnn_mode(benchmark=True, deterministic=False):
        x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
        ev.evaluate(Plain(Probe(64, 10), None, ThreatModel(0.1)), (x, y),
                    ev.EvalSpec(eps=(0.1,), attacks=("fgsm",), masking=None, adaptive=False))
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    assert seen and set(seen) == {(False, True)}
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == before
