"""Write a sweep's results: trials.csv, pareto.csv, pareto.png and manifest.json.

Every file is written to a temporary file in its destination folder and renamed into place,
so a reader (a dashboard, a notebook, a second aggregation) sees the previous complete file or
the new complete file, never half of one, even when the sweep is interrupted mid-write.
No Ray and no torch imports: versions are read from package metadata.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.aggregate import (DEFAULT_OBJECTIVES, flagged_mask, knee, pareto_front,
                                    with_suspect)
from orchestrator.records import COMPLETED, write_json_atomic

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VERSIONED_PACKAGES = ("torch", "ray", "optuna", "pandas", "numpy")
AXIS_LABELS = {"clean_acc": "clean accuracy", "robust_acc": "robust accuracy (worst attack)"}


# ---------------------------------------------------------------------------- atomic writing

def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it onto ``path``.

    The temp file lives in the same folder so ``os.replace`` is an atomic rename on one file
    system; on any failure it is removed and the previous ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


# ---------------------------------------------------------------------------- tables

def pareto_table(trials: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 exclude_flagged: bool = False) -> pd.DataFrame:
    """The front rows of ``trials`` with an ``is_knee`` column (exactly one True when the
    front is non-empty), best last-objective first: for the default objectives, robust_acc
    descending then clean_acc descending. ``trials`` must have a unique index."""
    front = pareto_front(trials, objectives, exclude_flagged=exclude_flagged)
    front = front.assign(is_knee=False)
    if not front.empty:
        front.loc[knee(front, objectives), "is_knee"] = True
    return front.sort_values(list(objectives)[::-1], ascending=False, kind="stable")


# ---------------------------------------------------------------------------- plot

def write_pareto_png(trials: pd.DataFrame, table: pd.DataFrame, path: str | Path,
                     objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> Path:
    """Scatter of completed trials (first objective on x, second on y) coloured by defense,
    suspect trials as crosses, the front as a staircase and the knee as a star."""
    x_col, y_col = objectives[0], objectives[1]
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = trials[(trials["status"] == COMPLETED) & trials[[x_col, y_col]].notna().all(axis=1)]
    if done.empty:
        ax.text(0.5, 0.5, "no completed trials", ha="center", va="center",
                transform=ax.transAxes, fontsize="large")
    else:
        _draw_trials(ax, done, x_col, y_col)
        _draw_front(ax, table, x_col, y_col, staircase=len(objectives) == 2)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        ax.grid(alpha=0.3)
    ax.set_xlabel(AXIS_LABELS.get(x_col, x_col))
    ax.set_ylabel(AXIS_LABELS.get(y_col, y_col))
    ax.set_title(f"{len(done)} completed trials, {len(table)} on the Pareto front")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _draw_trials(ax: Axes, done: pd.DataFrame, x_col: str, y_col: str) -> None:
    cmap = colormaps["tab10"]
    flagged = flagged_mask(done)
    for i, defense in enumerate(sorted(done["defense"].astype(str).unique())):
        mine = done["defense"].astype(str) == defense
        label: str | None = defense  # the first non-empty group carries the legend entry
        for marker, rows in (("o", done[mine & ~flagged]), ("x", done[mine & flagged])):
            if rows.empty:
                continue
            ax.scatter(rows[x_col], rows[y_col], marker=marker, s=28, alpha=0.8,
                       color=cmap(i % cmap.N), label=label)
            label = None
    if flagged.any():
        ax.scatter([], [], marker="x", color="dimgray", label="suspect (flag raised)")


def _draw_front(ax: Axes, table: pd.DataFrame, x_col: str, y_col: str,
                staircase: bool) -> None:
    if table.empty:
        return
    front = table.sort_values([x_col, y_col], ascending=[True, False], kind="stable")
    if staircase:
        ax.step(front[x_col], front[y_col], where="pre", color="black", lw=1.2,
                label="Pareto front")
    else:
        ax.scatter(front[x_col], front[y_col], s=80, facecolors="none", edgecolors="black",
                   label="Pareto front")
    k = table[table["is_knee"]].iloc[0]
    ax.scatter([k[x_col]], [k[y_col]], marker="*", s=260, color="gold", edgecolors="black",
               zorder=5, label=f"knee ({k['trial_id']})")


# ---------------------------------------------------------------------------- manifest

def write_manifest(out_dir: str | Path, spec: dict[str, Any], started: float,
                   ended: float | None, seeds: list[int],
                   extra: dict[str, Any] | None = None) -> Path:
    """manifest.json: what was run (spec, seeds), with what (versions, git SHA), where
    (hostname) and when (ISO-8601 UTC; ``ended`` None while a sweep is still running) —
    enough to reproduce or at least explain a results folder found months later."""
    payload = {
        "spec": spec,
        "seeds": list(seeds),
        "started": _iso_utc(started),
        "ended": None if ended is None else _iso_utc(ended),
        "hostname": socket.gethostname(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "extra": extra or {},
    }
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, payload)
    return path


def _iso_utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat()


def package_versions() -> dict[str, str | None]:
    """Python and key package versions from installed metadata (None when not installed):
    reading metadata instead of importing keeps torch and ray out of this process."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_sha(root: Path = PROJECT_ROOT) -> str | None:
    """HEAD of the project checkout, or None (no git, not a checkout, no commit yet)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and sha else None


# ---------------------------------------------------------------------------- entry point

def export_all(df: pd.DataFrame, out_dir: str | Path,
               objectives: Sequence[str] = DEFAULT_OBJECTIVES,
               exclude_flagged: bool = False) -> dict[str, Path]:
    """Write trials.csv (every trial), pareto.csv (the front, with ``is_knee``) and
    pareto.png into ``out_dir``; returns file name -> path. An empty ``df`` or one without
    a completed trial still yields header-only CSVs and a plot saying so. Flagged trials are
    always in trials.csv (``suspect`` names their flags); ``exclude_flagged`` keeps them off
    the front only."""
    out_dir = Path(out_dir)
    trials = with_suspect(df).reset_index(drop=True)
    table = pareto_table(trials, objectives, exclude_flagged)
    paths = {
        "trials.csv": write_csv(trials, out_dir / "trials.csv"),
        "pareto.csv": write_csv(table, out_dir / "pareto.csv"),
        "pareto.png": write_pareto_png(trials, table, out_dir / "pareto.png", objectives),
    }
    log.info("exported %d trials (%d on the front) to %s", len(trials), len(table), out_dir)
    return paths
