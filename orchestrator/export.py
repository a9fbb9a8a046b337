"""Write a sweep's results: trials.csv, pareto.csv (each also .parquet), pareto_by_eps.csv,
pareto.png and manifest.json.

pareto.csv is the front at the spec's primary ε (``robust_acc``); when the trials carry a
robustness curve (``robust_acc@<eps>`` columns), pareto_by_eps.csv holds one front per ε (column
``eps``, the objective's value in ``robust_acc_at_eps``) and pareto.png gets one panel per ε.
Suspect trials (any ``flag.*`` raised, e.g. a gradient-masking indicator) stay in every table
with ``suspect`` naming the flags, are drawn as crosses (ringed in red on a front), and are left
off the fronts with ``exclude_flagged``.

Every file is written to a temporary file in its destination folder and renamed into place,
so a reader (a dashboard, a notebook, a second aggregation) sees the previous complete file or
the new complete file, never half of one, even when the sweep is interrupted mid-write.
No Ray and no torch imports: versions are read from package metadata.
"""
from __future__ import annotations

import importlib.metadata
import logging
import platform
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from defenses.core.cache import atomic_write
from orchestrator.aggregate import (DEFAULT_OBJECTIVES, ci_columns, curve_columns, flagged_mask,
                                    fronts_by_eps, knee, objective_signs, on_front_within_ci,
                                    pareto_front, with_suspect)
from orchestrator.records import COMPLETED, iso_utc, write_json_atomic

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VERSIONED_PACKAGES = ("torch", "ray", "optuna", "pandas", "numpy")
AXIS_LABELS = {"clean_acc": "clean accuracy", "robust_acc": "robust accuracy (worst attack)",
               "cost": "cost (device-seconds of training and evaluation)"}
SIZE_RANGE = (12.0, 160.0)  # marker areas of the cheapest and the costliest trial
# trials.csv: off the front, but within its 95 % intervals of a front member that dominates it
WITHIN_CI_COLUMN = "on_front_within_ci"


# ---------------------------------------------------------------------------- atomic writing

def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """``df`` as Parquet (pyarrow, which Ray brings): typed columns for pandas/polars users
    with many runs. A column whose values are of several types (a hyperparameter that is a
    number for one defense and a string for another) is written as strings."""
    return atomic_write(path, lambda tmp: _one_type_per_column(df).to_parquet(tmp, index=False))


def _one_type_per_column(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns[out.dtypes == object]:
        values = out[col].dropna()
        if values.map(type).nunique() > 1:
            out[col] = out[col].map(lambda v: v if pd.isna(v) else str(v))
    return out


# ---------------------------------------------------------------------------- tables

def pareto_table(trials: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 exclude_flagged: bool = False) -> pd.DataFrame:
    """The front rows of ``trials`` with an ``is_knee`` column (exactly one True when the
    front is non-empty), ordered by the maximized objectives from the last (best first), then
    the minimized ones (least first): for the default objectives robust_acc descending then
    clean_acc descending, and so again with ``cost`` added (cheapest last among equals).
    ``trials`` must have a unique index."""
    front = pareto_front(trials, objectives, exclude_flagged=exclude_flagged)
    front = front.assign(is_knee=False)
    if not front.empty:
        front.loc[knee(front, objectives), "is_knee"] = True
    signs = dict(zip(objectives, objective_signs(objectives)))
    keys = [o for o in objectives[::-1] if signs[o] > 0] + [o for o in objectives if signs[o] < 0]
    return front.sort_values(keys, ascending=[signs[o] < 0 for o in keys], kind="stable")


def pareto_by_eps_table(trials: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                        exclude_flagged: bool = False) -> pd.DataFrame:
    """One front per ε of the robustness curve, stacked by increasing ε: every column of
    ``trials`` plus ``eps``, ``robust_acc_at_eps`` (the front's robust objective) and
    ``is_knee`` (one per ε). Empty (with those columns) when no trial has a curve."""
    parts = []
    for eps, (objs, _) in fronts_by_eps(trials, objectives, exclude_flagged).items():
        col = next(o for o in objs if o not in objectives)
        table = pareto_table(trials, objs, exclude_flagged)
        parts.append(table.assign(eps=eps, robust_acc_at_eps=table[col]))
    if not parts:
        return trials.iloc[:0].assign(is_knee=False, eps=float("nan"),
                                      robust_acc_at_eps=float("nan"))
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------- plot

def write_pareto_png(trials: pd.DataFrame, table: pd.DataFrame, path: str | Path,
                     objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                     exclude_flagged: bool = False) -> Path:
    """Scatter of completed trials coloured by defense, suspect trials as crosses, the front as
    a staircase (two maximized objectives) or ringed points, and the knee as a star: one panel
    for ``table`` (the primary ε), or, when the trials carry a robustness curve, one panel per
    ε with that ε's front. The axes are the first two maximized objectives; a third objective
    (``cost``) is the markers' size, from the cheapest trial (smallest) to the costliest."""
    panels = _panels(trials, table, objectives, exclude_flagged)
    fig = Figure(figsize=(8 + 5 * (len(panels) - 1), 5.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, objs, front) in zip(axes, panels):
        _draw_panel(ax, trials, front, objs, title)
    legend: dict[str, Any] = {}  # every panel's entries once (a suspect may be in one panel only)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axes[-1].legend(list(legend.values()), list(legend), loc="upper left",
                        bbox_to_anchor=(1.02, 1.0), fontsize="small")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _panels(trials: pd.DataFrame, table: pd.DataFrame, objectives: Sequence[str],
            exclude_flagged: bool) -> list[tuple[str, tuple[str, ...], pd.DataFrame]]:
    """(title suffix, objectives, front with is_knee) per panel."""
    curve = fronts_by_eps(trials, objectives, exclude_flagged) if "robust_acc" in objectives else {}
    if not curve:
        return [("", tuple(objectives), table)]
    return [(f"ε = {eps:.4g}", objs, pareto_table(trials, objs, exclude_flagged))
            for eps, (objs, _) in curve.items()]


def _plot_axes(objectives: Sequence[str]) -> tuple[str, str, str | None]:
    """(x, y, size) columns: the maximized objectives first, in the spec's order; the third
    objective, if any, is the marker size."""
    signs = objective_signs(objectives)
    ordered = [o for o, sg in zip(objectives, signs) if sg > 0] + \
              [o for o, sg in zip(objectives, signs) if sg < 0]
    return ordered[0], ordered[1], (ordered[2] if len(ordered) > 2 else None)


def _draw_panel(ax: Axes, trials: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str],
                title: str) -> None:
    x_col, y_col, size_col = _plot_axes(objectives)
    done = trials[(trials["status"] == COMPLETED) & trials[list(objectives)].notna().all(axis=1)] \
        if not trials.empty else trials
    if done.empty:
        ax.text(0.5, 0.5, "no completed trials", ha="center", va="center",
                transform=ax.transAxes, fontsize="large")
    else:
        sizes = _marker_sizes(done, size_col)
        _draw_trials(ax, done, x_col, y_col, sizes)
        _draw_front(ax, front, x_col, y_col,
                    staircase=len(objectives) == 2 and bool((objective_signs(objectives) > 0).all()))
        ax.grid(alpha=0.3)
    ax.set_xlabel(AXIS_LABELS.get(x_col, x_col))
    ax.set_ylabel(AXIS_LABELS.get(y_col, f"robust accuracy at {title}" if title else y_col))
    head = f"{title}: " if title else ""
    sized = "" if size_col is None or done.empty else \
        f"\nmarker size: {size_col}, {_span_text(done, size_col)}"
    ax.set_title(f"{head}{len(done)} completed trials, {len(front)} on the Pareto front{sized}",
                 fontsize="medium")


def _marker_sizes(done: pd.DataFrame, size_col: str | None) -> pd.Series:
    """Marker areas: 28 for every trial, or, with a third objective, its value scaled
    linearly from SIZE_RANGE's smallest (least) to its largest (most)."""
    if size_col is None:
        return pd.Series(28.0, index=done.index)
    v = done[size_col].astype(float)
    span = v.max() - v.min()
    unit = (v - v.min()) / span if span > 0 else v * 0 + 0.5
    return SIZE_RANGE[0] + unit * (SIZE_RANGE[1] - SIZE_RANGE[0])


def _span_text(done: pd.DataFrame, col: str) -> str:
    """"12.3–456 cpu_s": the range of ``col`` over ``done``, with the cost's unit."""
    units = done[f"{col}_unit"].dropna().astype(str).unique() if f"{col}_unit" in done else []
    return f"{done[col].min():.3g}–{done[col].max():.3g} {'/'.join(units)}".rstrip()


def _draw_trials(ax: Axes, done: pd.DataFrame, x_col: str, y_col: str, sizes: pd.Series) -> None:
    cmap = colormaps["tab10"]
    flagged = flagged_mask(done)
    for i, defense in enumerate(sorted(done["defense"].astype(str).unique())):
        mine = done["defense"].astype(str) == defense
        label: str | None = defense  # the first non-empty group carries the legend entry
        for marker, rows in (("o", done[mine & ~flagged]), ("x", done[mine & flagged])):
            if rows.empty:
                continue
            ax.scatter(rows[x_col], rows[y_col], marker=marker, s=sizes[rows.index], alpha=0.8,
                       color=cmap(i % cmap.N), label=label)
            label = None
    if flagged.any():
        ax.scatter([], [], marker="x", color="dimgray", label="suspect (flag raised)")


def _draw_front(ax: Axes, table: pd.DataFrame, x_col: str, y_col: str,
                staircase: bool) -> None:
    if table.empty:
        return
    front = table.sort_values([x_col, y_col], ascending=[True, False], kind="stable")
    _draw_intervals(ax, front, x_col, y_col)
    if staircase:
        ax.step(front[x_col], front[y_col], where="pre", color="black", lw=1.2,
                label="Pareto front")
    else:
        ax.scatter(front[x_col], front[y_col], s=80, facecolors="none", edgecolors="black",
                   label="Pareto front")
    suspect = table[flagged_mask(table)]
    if not suspect.empty:
        ax.scatter(suspect[x_col], suspect[y_col], s=140, facecolors="none", edgecolors="red",
                   linewidths=1.5, zorder=4, label="suspect on the front")
    k = table[table["is_knee"]].iloc[0]
    ax.scatter([k[x_col]], [k[y_col]], marker="*", s=260, color="gold", edgecolors="black",
               zorder=5, label=f"knee ({k['trial_id']})")


def _draw_intervals(ax: Axes, front: pd.DataFrame, x_col: str, y_col: str) -> None:
    """95 % interval bars of the front members, on both axes, where the rows carry them."""
    (x_lo, x_hi), (y_lo, y_hi) = ci_columns(x_col), ci_columns(y_col)
    if not {x_lo, x_hi, y_lo, y_hi} <= set(front.columns):
        return
    rows = front[front[[x_lo, x_hi, y_lo, y_hi]].notna().all(axis=1)]
    if rows.empty:
        return
    ax.errorbar(rows[x_col], rows[y_col],
                xerr=[rows[x_col] - rows[x_lo], rows[x_hi] - rows[x_col]],
                yerr=[rows[y_col] - rows[y_lo], rows[y_hi] - rows[y_col]],
                fmt="none", ecolor="black", elinewidth=0.8, capsize=2, alpha=0.6,
                label="95 % interval (front)")


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
        "started": iso_utc(started),
        "ended": None if ended is None else iso_utc(ended),
        "hostname": socket.gethostname(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "extra": extra or {},
    }
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, payload)
    return path


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
    """Write trials.csv (every trial), pareto.csv (the front at the primary ε, with
    ``is_knee``), both again as .parquet, pareto_by_eps.csv (one front per ε, only when the trials carry a robustness
    curve) and pareto.png into ``out_dir``; returns file name -> path. An empty ``df`` or one
    without a completed trial still yields header-only CSVs and a plot saying so. Flagged
    trials are always in the tables (``suspect`` names their flags); ``exclude_flagged`` keeps
    them off the fronts only."""
    out_dir = Path(out_dir)
    trials = with_suspect(df).reset_index(drop=True)
    trials[WITHIN_CI_COLUMN] = on_front_within_ci(trials, objectives, exclude_flagged) \
        if not trials.empty else pd.Series(dtype=bool)
    table = pareto_table(trials, objectives, exclude_flagged)
    paths = {
        "trials.csv": write_csv(trials, out_dir / "trials.csv"),
        "pareto.csv": write_csv(table, out_dir / "pareto.csv"),
        "trials.parquet": write_parquet(trials, out_dir / "trials.parquet"),
        "pareto.parquet": write_parquet(table, out_dir / "pareto.parquet"),
    }
    if curve_columns(trials) and "robust_acc" in objectives:
        paths["pareto_by_eps.csv"] = write_csv(
            pareto_by_eps_table(trials, objectives, exclude_flagged), out_dir / "pareto_by_eps.csv")
    paths["pareto.png"] = write_pareto_png(trials, table, out_dir / "pareto.png", objectives,
                                           exclude_flagged)
    log.info("exported %d trials (%d on the front) to %s", len(trials), len(table), out_dir)
    return paths
