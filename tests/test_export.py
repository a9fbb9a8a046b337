"""Exporters: CSV / PNG contents, atomic writes, manifest."""
from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator import export
from defenses.core.cache import atomic_write
from orchestrator.export import export_all, write_csv, write_manifest
from orchestrator.records import TrialRecord

REQUIRED = ["trial_id", "defense", "status", "clean_acc", "robust_acc", "robust_attack",
            "train_seconds", "checkpoint", "error", "suspect"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trials_df(seed: int, n: int = 120) -> pd.DataFrame:
    """Rows as run_trial would produce them: ties, failures, NaN and flagged trials."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        failed = rng.random() < 0.15
        clean, robust = rng.integers(0, 8, 2) / 8
        rows.append(TrialRecord(
            trial_id=f"t{i:03d}", defense=str(rng.choice(["pgd_at", "trades", "sad"])),
            dataset="cifar10", model="resnet18", seed=int(rng.integers(3)),
            status="failed" if failed else "completed", hp={"lr": float(rng.random())},
            clean_acc=np.nan if failed else float(clean),
            robust_acc=np.nan if failed else float(robust), robust_attack="pgd",
            acc={} if failed else {"pgd": float(robust), "fgsm": float(robust) + 0.1},
            flags={"gradient_masking": bool(rng.random() < 0.1)}, train_seconds=1.0,
            error="boom" if failed else "", run_id="r").to_row())
    return pd.DataFrame(rows)


def brute_force_front_ids(trials: pd.DataFrame, exclude_flagged: bool) -> set[str]:
    ok = (trials.status == "completed") & trials[["clean_acc", "robust_acc"]].notna().all(axis=1)
    if exclude_flagged:
        ok &= trials["suspect"].fillna("") == ""
    cand = trials[ok]
    pts = cand[["clean_acc", "robust_acc"]].to_numpy()
    ids = set()
    for i, p in enumerate(pts):
        if not ((pts >= p).all(axis=1) & (pts > p).any(axis=1)).any():
            ids.add(cand.trial_id.iloc[i])
    return ids


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exclude_flagged", [False, True])
def test_pareto_csv_is_the_front_of_trials_csv(tmp_path: Path, seed: int,
                                               exclude_flagged: bool) -> None:
    df = trials_df(seed)
    paths = export_all(df, tmp_path, exclude_flagged=exclude_flagged)
    assert set(paths) == {"trials.csv", "pareto.csv", "trials.parquet", "pareto.parquet", "pareto.png"}
    for name in ("trials", "pareto"):  # the Parquet tables hold what the CSVs hold
        parquet, csv = pd.read_parquet(paths[f"{name}.parquet"]), pd.read_csv(paths[f"{name}.csv"])
        assert list(parquet.columns) == list(csv.columns) and len(parquet) == len(csv)
        # numbers alike (CSV reads an all-'' column back as NaN; Parquet keeps the strings)
        numbers = csv.select_dtypes("number").columns.intersection(parquet.select_dtypes("number").columns)
        assert len(numbers) > 5
        pd.testing.assert_frame_equal(parquet[numbers].astype(float), csv[numbers].astype(float))

    trials = pd.read_csv(paths["trials.csv"])
    pareto = pd.read_csv(paths["pareto.csv"])
    assert len(trials) == len(df)
    assert set(REQUIRED + ["hp.lr", "acc.pgd", "acc.fgsm"]) <= set(trials.columns)
    assert list(pareto.columns) == list(trials.columns) + ["is_knee"]
    assert set(pareto.trial_id) == brute_force_front_ids(trials, exclude_flagged)
    assert len(pareto) == len(set(pareto.trial_id))
    assert pareto["is_knee"].sum() == 1
    order = list(zip(pareto.robust_acc, pareto.clean_acc))
    assert order == sorted(order, reverse=True)
    assert paths["pareto.png"].read_bytes().startswith(PNG_MAGIC)


def test_flagged_trials_stay_in_trials_csv_with_suspect(tmp_path: Path) -> None:
    df = trials_df(0)
    flagged = df["flag.gradient_masking"]
    assert flagged.any()
    trials = pd.read_csv(export_all(df, tmp_path, exclude_flagged=True)["trials.csv"])
    suspect = trials["suspect"].fillna("")
    assert (suspect[flagged.to_numpy()] == "gradient_masking").all()
    assert (suspect[~flagged.to_numpy()] == "").all()


@pytest.mark.parametrize("case", ["empty", "all_failed"])
def test_no_completed_trials_gives_header_only_csvs(tmp_path: Path, case: str) -> None:
    df = pd.DataFrame() if case == "empty" else trials_df(1).assign(status="failed")
    paths = export_all(df, tmp_path)
    pareto = pd.read_csv(paths["pareto.csv"])
    assert pareto.empty and set(REQUIRED + ["is_knee"]) <= set(pareto.columns)
    trials = pd.read_csv(paths["trials.csv"])
    assert set(REQUIRED) <= set(trials.columns) and len(trials) == len(df)
    assert paths["pareto.png"].read_bytes().startswith(PNG_MAGIC)


def test_plot_says_no_completed_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts: list[str] = []
    real_text = export.Axes.text
    monkeypatch.setattr(export.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(
                            self, x, y, s, *a, **k))
    export_all(pd.DataFrame(), tmp_path)
    assert texts == ["no completed trials"]


# ---------------------------------------------------------------------------- atomic writes

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    export_all(trials_df(2), tmp_path)
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.csv", "pareto.parquet", "pareto.png",
                                                         "trials.csv", "trials.parquet"]


def test_failed_write_keeps_previous_file(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "trials.csv"
    write_csv(pd.DataFrame({"a": [1, 2]}), target)
    before = target.read_bytes()

    def half_then_crash(self: pd.DataFrame, path: Path, **kwargs: object) -> None:
        Path(path).write_text("a\n1\n")   # half a file on disk...
        raise OSError("disk full")        # ...then the writer dies

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_csv(pd.DataFrame({"a": [3, 4, 5]}), target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_atomic_write_interrupt_is_cleaned_up(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "pareto.png", interrupted)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- manifest

def test_manifest_contents(tmp_path: Path) -> None:
    spec = {"defenses": ["pgd_at"], "trials": 4}
    path = write_manifest(tmp_path, spec, started=0.0, ended=3600.5, seeds=[0, 1],
                          extra={"note": "x"})
    m = json.loads(path.read_text())
    assert path == tmp_path / "manifest.json"
    assert m["spec"] == spec and m["seeds"] == [0, 1] and m["extra"] == {"note": "x"}
    assert m["started"] == "1970-01-01T00:00:00+00:00"
    assert datetime.datetime.fromisoformat(m["ended"]) == datetime.datetime(
        1970, 1, 1, 1, 0, 0, 500000, tzinfo=datetime.timezone.utc)
    assert set(m["versions"]) == {"python", "torch", "ray", "optuna", "pandas", "numpy"}
    assert m["versions"]["pandas"] == pd.__version__
    assert m["hostname"]
    assert leftovers(tmp_path) == []


def test_manifest_tolerates_missing_package_git_and_running_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "VERSIONED_PACKAGES", ("numpy", "no-such-package-xyz"))

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    m = json.loads(write_manifest(tmp_path, {}, started=10.0, ended=None, seeds=[]).read_text())
    assert m["ended"] is None and m["git_sha"] is None
    assert m["versions"]["no-such-package-xyz"] is None and m["versions"]["numpy"]


def test_git_sha_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert export.git_sha(tmp_path) is None
