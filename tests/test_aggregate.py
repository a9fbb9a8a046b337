"""Pareto front, hypervolume, knee, run merging and the aggregate CLI."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.aggregate import cli as aggregate
from orchestrator.aggregate import (hypervolume, knee, merge_runs, nondominated, pareto_front,
                                    reference_point, suspect_labels)
from orchestrator.records import IDENTITY_COLUMNS, TrialRecord, save_record

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- references

def brute_force_nondominated(points: np.ndarray) -> np.ndarray:
    """O(n^2) definition: dominated iff some row is >= everywhere and > somewhere."""
    ge = (points[None, :, :] >= points[:, None, :]).all(axis=2)
    gt = (points[None, :, :] > points[:, None, :]).any(axis=2)
    return ~(ge & gt).any(axis=1)


def random_trials(seed: int, n: int, integer: bool, k: int = 2) -> pd.DataFrame:
    """Trials with failed rows, NaN objectives and (when integer) many ties/duplicates,
    under a shuffled non-default index so label and order handling is exercised."""
    rng = np.random.default_rng(seed)
    cols = ["clean_acc", "robust_acc", "metric.third"][:k]
    values = rng.integers(0, 6, (n, k)).astype(float) if integer else rng.random((n, k))
    df = pd.DataFrame(values, columns=cols)
    df["status"] = np.where(rng.random(n) < 0.1, "failed", "completed")
    df.loc[rng.random(n) < 0.05, cols[1]] = np.nan
    df.index = rng.permutation(n) * 3 + 100
    return df


def reference_front_labels(df: pd.DataFrame, objectives: list[str]) -> list:
    ok = (df["status"] == "completed") & df[objectives].notna().all(axis=1)
    cand = df[ok]
    return list(cand.index[brute_force_nondominated(cand[objectives].to_numpy())])


# ---------------------------------------------------------------------------- pareto_front

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer", [False, True])
def test_front_matches_brute_force_2d(seed: int, integer: bool) -> None:
    df = random_trials(seed, 400, integer)
    front = pareto_front(df)
    expected = reference_front_labels(df, ["clean_acc", "robust_acc"])
    assert list(front.index) == expected  # same rows, original order kept
    assert front.columns.equals(df.columns)


@pytest.mark.parametrize("seed", range(3))
def test_front_matches_brute_force_3d(seed: int) -> None:
    df = random_trials(seed, 300, integer=True, k=3)
    objectives = ["clean_acc", "robust_acc", "metric.third"]
    assert list(pareto_front(df, objectives).index) == reference_front_labels(df, objectives)


@pytest.mark.parametrize("k,seed", [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)])
def test_nondominated_keeps_every_copy_of_a_maximal_point(k: int, seed: int) -> None:
    # few distinct values: many ties and duplicates, which moocore drops unless told not to
    pts = np.random.default_rng(seed).integers(0, 4, (300, k)).astype(float)
    np.testing.assert_array_equal(nondominated(pts), brute_force_nondominated(pts))
    assert nondominated(np.zeros((0, k))).shape == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_cost_front_matches_brute_force_3d(seed: int) -> None:
    """The 3-D front of the sweep's objectives (cost minimized) against the O(n²) oracle on
    the accuracies and the negated cost."""
    rng = np.random.default_rng(seed)
    df = random_trials(seed, 400, integer=bool(seed % 2))
    df["cost"] = rng.integers(1, 6, len(df)).astype(float) if seed % 2 else rng.uniform(1, 100, len(df))
    objectives = ["clean_acc", "robust_acc", "cost"]
    ok = (df["status"] == "completed") & df[objectives].notna().all(axis=1)
    signed = df.loc[ok, objectives].to_numpy() * np.array([1, 1, -1])
    expected = list(df.index[ok][brute_force_nondominated(signed)])
    front = pareto_front(df, objectives)
    assert list(front.index) == expected


def test_duplicates_stay_and_ties_are_dominated() -> None:
    df = pd.DataFrame({"clean_acc": [1.0, 1.0, 0.5, 1.0, 0.2, 0.2],
                       "robust_acc": [1.0, 1.0, 0.5, 0.5, 1.0, 1.0]})
    # (1,0.5) and (0.2,1) tie with (1,1) in one objective and lose in the other.
    assert list(pareto_front(df).index) == [0, 1]


def test_single_extreme_points_with_infinities() -> None:
    df = pd.DataFrame({"clean_acc": [3.0, 3.0, 1.0], "robust_acc": [-np.inf, -np.inf, 2.0]})
    assert list(pareto_front(df).index) == [0, 1, 2]


def test_failed_nan_and_flagged_rows_are_excluded() -> None:
    df = pd.DataFrame({"clean_acc": [0.9, 0.95, 0.99, 0.7, 0.6],
                       "robust_acc": [0.9, 0.95, np.nan, 0.5, 0.99],
                       "status": ["completed", "failed", "completed", "completed", "completed"],
                       "flag.masking": [True, False, False, False, np.nan]})
    assert list(pareto_front(df).index) == [0, 4]
    assert list(pareto_front(df, exclude_flagged=True).index) == [3, 4]


def test_cost_is_minimized() -> None:
    df = pd.DataFrame({"robust_acc": [0.5, 0.5, 0.4], "cost": [10.0, 5.0, 1.0]})
    assert list(pareto_front(df, ["robust_acc", "cost"]).index) == [1, 2]
    # any other column is maximized
    assert list(pareto_front(df.rename(columns={"cost": "other"}), ["robust_acc", "other"]).index) == [0]


def test_missing_objective_column_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="robust_acc"):
        pareto_front(pd.DataFrame({"clean_acc": [1.0]}))


def test_empty_input_gives_empty_front() -> None:
    df = pd.DataFrame({"clean_acc": [], "robust_acc": [], "status": []})
    assert pareto_front(df).empty


# ---------------------------------------------------------------------------- hypervolume

def xy(points: list[tuple[float, ...]], names=("clean_acc", "robust_acc")) -> pd.DataFrame:
    return pd.DataFrame(points, columns=list(names))


def test_hypervolume_2d_staircase() -> None:
    stairs = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(xy(stairs)) == pytest.approx(6.0)
    # Dominated points and duplicates add nothing.
    assert hypervolume(xy(stairs + [(1, 1), (2, 2), (0.5, 2.5)])) == pytest.approx(6.0)
    # Strips: (1-.5)*(3-.5) + (2-1)*(2-.5) + (3-2)*(1-.5) = 1.25 + 1.5 + 0.5
    assert hypervolume(xy(stairs), reference=(0.5, 0.5)) == pytest.approx(3.25)


def test_hypervolume_ignores_points_not_beyond_the_reference() -> None:
    assert hypervolume(xy([(5, 0), (0, 5)])) == 0.0
    assert hypervolume(xy([(0.2, 10), (2, 2)]), reference=(0.5, 0.5)) == pytest.approx(2.25)
    assert hypervolume(xy([(-1, -1)]), reference=(0, 0)) == 0.0


def test_hypervolume_skips_failed_and_nan_rows() -> None:
    df = xy([(2, 2), (10, 10), (5, np.nan)])
    df["status"] = ["completed", "failed", "completed"]
    assert hypervolume(df) == pytest.approx(4.0)


def test_hypervolume_3d_boxes() -> None:
    names = ("a", "b", "c")
    assert hypervolume(xy([(2, 3, 4)], names), names) == pytest.approx(24.0)
    # 2*2*1 + 1*1*3 - overlap 1*1*1
    assert hypervolume(xy([(2, 2, 1), (1, 1, 3)], names), names) == pytest.approx(6.0)
    assert hypervolume(xy([(2, 3, 4)], names), names, reference=(1, 1, 1)) == pytest.approx(6.0)


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (3, 2), (4, 3)])
def test_hypervolume_matches_unit_cell_count(k: int, seed: int) -> None:
    """For integer points and reference 0 the volume is the number of unit cells whose upper
    corner some point dominates: an independent exact reference."""
    pts = np.random.default_rng(seed).integers(0, 5, (12, k))
    names = [f"o{i}" for i in range(k)]
    cells = sum(bool((pts >= np.array(c) + 1).all(axis=1).any())
                for c in itertools.product(range(5), repeat=k))
    assert hypervolume(pd.DataFrame(pts, columns=names), names) == pytest.approx(cells)


def test_hypervolume_with_cost_counts_unit_cells() -> None:
    """Cost minimized from a reference above it: the volume is the number of unit cells
    (accuracy lattice × cost lattice below the reference) some point dominates."""
    rng = np.random.default_rng(7)
    pts = np.column_stack([rng.integers(0, 5, 15), rng.integers(0, 5, 15), rng.integers(1, 6, 15)])
    names = ["clean_acc", "robust_acc", "cost"]
    cells = sum(bool(((pts[:, 0] >= a + 1) & (pts[:, 1] >= b + 1) & (pts[:, 2] <= c)).any())
                for a, b, c in itertools.product(range(5), range(5), range(6)))
    df = pd.DataFrame(pts, columns=names)
    assert hypervolume(df, names, reference=(0, 0, 6)) == pytest.approx(cells)


def test_default_reference_puts_the_costliest_trial_inside() -> None:
    names = ["clean_acc", "robust_acc", "cost"]
    np.testing.assert_allclose(reference_point(np.array([[0.9, 0.5, 10.0], [0.8, 0.6, 20.0]]), names),
                               [0.0, 0.0, 22.0])
    # one point: its box, 0.9 × 0.5 × (1.1·10 − 10)
    assert hypervolume(xy([(0.9, 0.5, 10.0)], names), names) == pytest.approx(0.9 * 0.5 * 1.0)


def test_hypervolume_reference_must_match_objectives() -> None:
    with pytest.raises(ValueError, match="reference"):
        hypervolume(xy([(1, 1)]), reference=(0, 0, 0))


# ---------------------------------------------------------------------------- knee

def test_knee_is_farthest_beyond_the_chord() -> None:
    front = pd.DataFrame({"clean_acc": [0.0, 20.0, 50.0, 90.0, 100.0],  # scale is irrelevant
                          "robust_acc": [1.0, 0.95, 0.8, 0.3, 0.0]},
                         index=["a", "b", "c", "d", "e"])
    # Distances to x+y=1 after normalisation: b .15, c .30, d .20 (all over sqrt 2).
    assert knee(front) == "c"


def test_knee_ignores_a_point_bulging_towards_the_origin() -> None:
    front = pd.DataFrame({"clean_acc": [1.0, 0.1, 0.6, 0.0],
                          "robust_acc": [0.0, 0.1, 0.5, 1.0]}, index=[7, 8, 9, 10])
    assert knee(front) == 9  # 8 is farther from the chord but on the wrong side


def test_knee_with_cost_prefers_the_cheap_balanced_trial() -> None:
    names = ["clean_acc", "robust_acc", "cost"]
    front = pd.DataFrame([(0.99, 0.10, 50.0), (0.90, 0.50, 10.0), (0.80, 0.60, 90.0)],
                         columns=names, index=["a", "b", "c"])
    assert list(pareto_front(front, names).index) == ["a", "b", "c"]
    # normalized sums: a 1 + 0 + 0.5, b 0.53 + 0.8 + 1, c 0 + 1 + 0
    assert knee(front, names) == "b"


def test_knee_small_fronts_use_largest_normalised_sum() -> None:
    assert knee(pd.DataFrame({"clean_acc": [0.7], "robust_acc": [0.2]}, index=[42])) == 42
    two = pd.DataFrame({"clean_acc": [0.9, 0.2], "robust_acc": [0.1, 0.95]}, index=[5, 3])
    # normalised sums tie at 1: the more robust one, in whichever order the rows come
    assert knee(two) == 3 and knee(two.iloc[::-1]) == 3
    with pytest.raises(ValueError):
        knee(two.iloc[:0])


# ---------------------------------------------------------------------------- merge_runs

def rec(trial_id: str, run_id: str, clean: float, **kw) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, defense=kw.pop("defense", "pgd_at"),
                       dataset="cifar10", model="resnet18", seed=0, status="completed",
                       clean_acc=clean, robust_acc=kw.pop("robust", clean / 2), run_id=run_id,
                       **kw)


def test_merge_runs_dedups_orders_columns_and_names_suspects(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save_record(a, rec("t0", "r1", 0.8, hp={"lr": 0.1, "eps": 8}, acc={"pgd": 0.4},
                       flags={"masking": True, "co": True}))
    save_record(a, rec("t1", "r1", 0.7, metrics={"auc": 0.9}))
    save_record(b, rec("t1", "r1", 0.75, acc={"fgsm": 0.5, "apgd": 0.3}))  # same trial, later
    save_record(b, rec("t0", "", 0.6, hp={"beta": 6.0}))                      # no run_id
    df = merge_runs([a, b])

    assert len(df) == 3
    assert df.loc[(df.run_id == "r1") & (df.trial_id == "t1"), "clean_acc"].item() == 0.75
    assert df.loc[df.run_id == "b", "trial_id"].item() == "t0"
    assert list(df.columns) == [*IDENTITY_COLUMNS, "hp.beta", "hp.eps", "hp.lr",
                                "acc.apgd", "acc.fgsm", "acc.pgd", "flag.co", "flag.masking",
                                "metric.auc", "error", "warning", "suspect"]
    assert df.set_index(["run_id", "trial_id"])["suspect"].to_dict() == {
        ("r1", "t0"): "co,masking", ("r1", "t1"): "", ("b", "t0"): ""}


def test_merge_runs_of_empty_run_has_the_schema(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir()
    df = merge_runs([tmp_path])
    assert df.empty and list(df.columns) == [*IDENTITY_COLUMNS, "error", "warning", "suspect"]


def test_suspect_labels_ignore_missing_flags() -> None:
    df = pd.DataFrame({"flag.a": [True, np.nan, False], "flag.b": [True, True, np.nan]})
    assert suspect_labels(df).tolist() == ["a,b", "b", ""]


# ---------------------------------------------------------------------------- CLI

def test_cli_missing_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "orchestrator.aggregate",
                           str(tmp_path / "nope"), "--out", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "does not exist" in lines[0]
    assert done.stdout == "" and not out.exists()


@pytest.mark.parametrize("case", ["no_records", "several_without_out", "no_args"])
def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    (tmp_path / "bare").mkdir()
    (tmp_path / "r1" / "records").mkdir(parents=True)
    (tmp_path / "r2" / "records").mkdir(parents=True)
    argv = {"no_records": [str(tmp_path / "bare")],
            "several_without_out": [str(tmp_path / "r1"), str(tmp_path / "r2")],
            "no_args": []}[case]
    try:
        code = aggregate.main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert {"no_records": "records/", "several_without_out": "--out",
            "no_args": "RUN_DIR"}[case] in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bare", "r1", "r2", "records",
                                                           "records"]


def test_cli_merges_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_record(tmp_path / "r1", rec("t0", "r1", 0.9, robust=0.1))
    save_record(tmp_path / "r1", rec("t1", "r1", 0.5, robust=0.2))
    save_record(tmp_path / "r2", rec("t0", "r2", 0.6, robust=0.5, defense="trades"))
    out = tmp_path / "merged"
    assert aggregate.main([str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(out)]) == 0
    trials = pd.read_csv(out / "trials.csv")
    pareto = pd.read_csv(out / "pareto.csv")
    assert sorted(zip(trials.run_id, trials.trial_id)) == [("r1", "t0"), ("r1", "t1"),
                                                          ("r2", "t0")]
    assert list(zip(pareto.run_id, pareto.trial_id)) == [("r2", "t0"), ("r1", "t0")]
    assert (out / "pareto.png").stat().st_size > 0
    assert "3 trials" in capsys.readouterr().out


def test_cli_out_never_replaces_files_without_force(tmp_path: Path, capsys) -> None:
    save_record(tmp_path / "r1", rec("t0", "r1", 0.9, robust=0.1))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "pareto.csv").write_text("precious")
    assert aggregate.main([str(tmp_path / "r1"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pareto.csv" in err[0] and "--force" in err[0]
    assert (out / "pareto.csv").read_text() == "precious" and not (out / "trials.csv").exists()
    assert aggregate.main([str(tmp_path / "r1"), "--out", str(out), "--force"]) == 0
    assert pd.read_csv(out / "pareto.csv").trial_id.tolist() == ["t0"]


def test_cli_single_run_writes_into_the_run_dir(tmp_path: Path) -> None:
    save_record(tmp_path, rec("t0", "r1", 0.9))
    assert aggregate.main([str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "pareto.csv")["is_knee"].tolist() == [True]
    assert math.isclose(pd.read_csv(tmp_path / "trials.csv")["clean_acc"].item(), 0.9)


def test_cli_takes_the_runs_objectives_or_objectives(tmp_path: Path, capsys) -> None:
    # t1 is dominated on the accuracies but cheaper: on the 3-D front only
    save_record(tmp_path, rec("t0", "r1", 0.9, robust=0.5, cost=100.0))
    save_record(tmp_path, rec("t1", "r1", 0.8, robust=0.4, cost=10.0))
    assert aggregate.main([str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "pareto.csv").trial_id.tolist() == ["t0"]
    (tmp_path / "spec.json").write_text('{"objectives": ["clean_acc", "robust_acc", "cost"]}')
    assert aggregate.main([str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "pareto.csv").trial_id.tolist() == ["t0", "t1"]
    assert "(clean_acc, robust_acc, cost)" in capsys.readouterr().out
    assert aggregate.main([str(tmp_path), "--objectives", "robust_acc,cost"]) == 0
    assert pd.read_csv(tmp_path / "pareto.csv").trial_id.tolist() == ["t0", "t1"]
    assert aggregate.main([str(tmp_path), "--objectives", "robust_acc,speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown objective 'speed'" in err[0]
