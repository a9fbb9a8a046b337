"""A front that holds under stronger attacks: every attack an evaluation ran counts, robust
accuracy never rises with ε, every accuracy carries its 95 % Wilson interval, and the front's
uncertainty is visible in trials.csv."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from defenses.evaluation.benchmark import EvalResult, monotone_in_eps
from orchestrator.aggregate import front_layers, on_front_within_ci, reaches_front
from orchestrator.records import TrialRecord
from orchestrator.stats import accuracy_interval, wilson_interval

EPS = 0.3


# ---------------------------------------------------------------- Wilson intervals

@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.4902, 0.9433),     # the textbook example (Wilson 1927; Agresti & Coull 1998)
    (0, 10, 0.0, 0.2775),        # never collapses to [0, 0] at 0 %
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (485, 1000, 0.4541, 0.5160),
])
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_edge_cases():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert all(math.isnan(v) for v in accuracy_interval(math.nan, 100))
    assert accuracy_interval(0.8, 10) == wilson_interval(8, 10)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_record_rows_carry_intervals_for_every_accuracy():
    rec = TrialRecord("t", "pgd_at", "mnist5k", "small_cnn", 0, status="completed",
                      clean_acc=0.8, robust_acc=0.5, n_eval=10,
                      curve={"robust_acc@0.1": 0.8, "n_eval@0.1": 10.0})
    row = rec.to_row()
    assert (row["clean_acc_ci_low"], row["clean_acc_ci_high"]) == wilson_interval(8, 10)
    assert (row["robust_acc_ci_low"], row["robust_acc_ci_high"]) == wilson_interval(5, 10)
    assert (row["robust_acc_ci_low@0.1"], row["robust_acc_ci_high@0.1"]) == wilson_interval(8, 10)
    assert row["n_eval"] == 10 and row["final_evaluated"] is False


# ---------------------------------------------------------------- fronts and their intervals

def _trials(rows):
    out = []
    for tid, clean, robust, n in rows:
        out.append(TrialRecord(tid, "d", "mnist5k", "small_cnn", 0, status="completed",
                               clean_acc=clean, robust_acc=robust, n_eval=n).to_row())
    return pd.DataFrame(out)


def test_within_ci_marks_dominated_trials_the_data_cannot_separate():
    df = _trials([("front", 0.90, 0.50, 100), ("close", 0.89, 0.48, 100),
                  ("far", 0.60, 0.10, 100), ("precise", 0.80, 0.30, 100_000)])
    within = on_front_within_ci(df).set_axis(df.trial_id)
    assert within["close"] and not within["far"] and not within["front"]
    reach = reaches_front(df).set_axis(df.trial_id)
    assert reach["front"] and reach["close"] and not reach["far"] and not reach["precise"]


def test_front_layers_are_non_dominated_sorting():
    df = _trials([("a", 0.9, 0.5, 0), ("b", 0.8, 0.4, 0), ("c", 0.7, 0.3, 0), ("d", 0.95, 0.1, 0)])
    assert set(front_layers(df, layers=1).trial_id) == {"a", "d"}
    assert set(front_layers(df, layers=2).trial_id) == {"a", "b", "d"}


# ---------------------------------------------------------------- every attack counts

def _result(eps: float, mask: list[bool]) -> EvalResult:
    m = torch.tensor(mask)
    return EvalResult(clean_acc=1.0, robust_acc=m.float().mean().item(), robust_attack="pgd-20",
                      acc={"pgd-20": m.float().mean().item()}, broken_by={"pgd-20": 0},
                      clean_rejected=0.0, n=len(mask), seconds=0.0, eps=eps, robust_mask=m)


def test_a_point_broken_at_a_smaller_eps_is_broken_at_every_larger_one():
    small = _result(0.1, [True, False, True, True])
    big = _result(0.3, [True, True, False, True, True, True])   # more points at the primary ε
    results = {0.3: big, 0.1: small}
    monotone_in_eps(results)
    assert big.robust_mask.tolist() == [True, False, False, True, True, True]
    assert big.broken_by["smaller_eps"] == 1 and big.robust_acc == pytest.approx(4 / 6)
    assert small.robust_mask.tolist() == [True, False, True, True]   # the smaller ε is untouched


# ---------------------------------------------------------------- bad input, before Ray

@pytest.mark.parametrize("update, match", [
    ({"final_samples": 0}, "final_samples"),
    ({"final_samples": 1001}, "final_samples=1001 exceeds the 1000 test images of mnist5k"),
    ({"eval_samples": 5000}, "eval_samples=5000 exceeds the 1000 test images"),
    ({"threat_model": {"curve_samples": 1200}},
     "threat_model.curve_samples=1200 exceeds the 1000 test images"),
    ({"threat_model": {"final_eval": ["apgd_ce-x"]}}, "unknown attack or preset 'apgd_ce-x'"),
    ({"threat_model": {"final_eval": ["strongest"]}}, "unknown attack or preset 'strongest'"),
])
def test_bad_final_evaluation_settings_are_one_line_spec_errors(update, match):
    from orchestrator.spec import SpecError, parse

    with pytest.raises(SpecError, match=match) as e:
        parse({"defenses": ["standard"], **update})
    assert "\n" not in str(e.value)


def test_the_sweep_cli_rejects_a_bad_final_eval_with_exit_2(capsys, tmp_path):
    from orchestrator.sweep import main

    assert main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--final-eval", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown attack or preset 'nope'" in err[0]
    assert not (tmp_path / "out").exists()


def test_paper_for_a_defense_without_a_paper_setting_stops_the_spec():
    from defenses.core import registry
    from defenses.evaluation.benchmark import EvalConfigError, check_paper
    from orchestrator.spec import SpecError, parse

    without = [d for d in registry.names()
               if not _defines_paper(registry.get(d), check_paper, EvalConfigError)]
    if not without:
        pytest.skip("every registered defense defines a paper setting")
    with pytest.raises(SpecError, match=f"threat_model.final_eval: preset 'paper': defense "
                                        f"'{without[0]}' defines no paper setting") as e:
        parse({"defenses": [without[0]], "threat_model": {"final_eval": ["paper"]}})
    assert "\n" not in str(e.value)


def _defines_paper(cls, check_paper, error) -> bool:
    try:
        check_paper(cls, ["paper"])
    except error:
        return False
    return True
