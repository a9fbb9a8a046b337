"""Merge trial records from one or more runs, find the Pareto front, its knee and its
hypervolume — at the primary ε (``robust_acc``) and, for trials that carry a robustness curve
(``robust_acc@<eps>`` columns), one front per ε (``fronts_by_eps``).

Everything here works on plain DataFrames of ``TrialRecord.to_row()`` rows so that the same
code serves a live sweep, a finished run dir and a CSV someone reloaded in a notebook. No Ray,
no torch: the aggregator must run on a laptop without the training stack.

The command line (``python -m orchestrator.aggregate RUN_DIR ...``) is ``cli.py`` beside
this file: it writes through ``orchestrator.export``, which builds on this module.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.records import COMPLETED, IDENTITY_COLUMNS, OBJECTIVES, load_records

log = logging.getLogger(__name__)

DEFAULT_OBJECTIVES: tuple[str, ...] = ("clean_acc", "robust_acc")
# Prefixed column groups of a trial row, in CSV order (see TrialRecord.to_row).
CURVE_PREFIX = "robust_acc@"   # robustness curve: robust_acc@<eps> (e.g. robust_acc@0.1, @8/255)
GROUP_PREFIXES: tuple[str, ...] = (CURVE_PREFIX, "robust_acc_ci_", "n_eval@", "hp.", "acc.", "flag.",
                                   "metric.")
FLAG_PREFIX = "flag."
SUSPECT_COLUMN = "suspect"
TAIL_COLUMNS: tuple[str, ...] = ("error", "warning", SUSPECT_COLUMN)


# ---------------------------------------------------------------------------- columns / flags

def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Put columns in the one CSV order: identity, sorted hp.*/acc.*/flag.*/metric.*, error,
    suspect, then anything unknown. Missing identity/tail columns are added (empty) so that
    downstream code and header-only CSVs always see the same schema."""
    cols = list(df.columns)
    grouped = [sorted(c for c in cols if isinstance(c, str) and c.startswith(p)
                      and c not in IDENTITY_COLUMNS) for p in GROUP_PREFIXES]
    known = set(IDENTITY_COLUMNS) | set(TAIL_COLUMNS) | {c for g in grouped for c in g}
    order = [*IDENTITY_COLUMNS, *(c for g in grouped for c in g), *TAIL_COLUMNS,
             *(c for c in cols if c not in known)]
    return df.reindex(columns=order)


def flag_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if isinstance(c, str) and c.startswith(FLAG_PREFIX)]


def flagged_mask(df: pd.DataFrame) -> pd.Series:
    """True where any ``flag.*`` is True. A missing flag (NaN: the trial never computed it)
    counts as not raised, so merging runs with different flag sets flags nobody by accident."""
    cols = flag_columns(df)
    if not cols:
        return pd.Series(False, index=df.index)
    return df[cols].eq(True).any(axis=1)


def suspect_labels(df: pd.DataFrame) -> pd.Series:
    """Comma-separated names of the flags raised per row ("" when none): the human-readable
    reason a trial's numbers should not be trusted (e.g. gradient masking)."""
    out = pd.Series("", index=df.index, dtype=object)
    for col in flag_columns(df):
        out = out + np.where(df[col].eq(True), col[len(FLAG_PREFIX):] + ",", "")
    return out.str.rstrip(",").astype(object)


def with_suspect(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` in CSV column order with ``suspect`` recomputed from the flags."""
    out = df.copy()
    out[SUSPECT_COLUMN] = suspect_labels(df)
    return order_columns(out)


# ---------------------------------------------------------------------------- curve columns

def parse_eps_label(label: str) -> float:
    """``"0.3"`` -> 0.3, ``"8/255"`` -> 8/255 (the spellings of defenses.evaluation.benchmark.eps_label)."""
    num, _, den = label.partition("/")
    return float(num) / float(den) if den else float(num)


def curve_columns(df: pd.DataFrame) -> list[tuple[float, str]]:
    """(ε, column) of every ``robust_acc@<eps>`` column, by increasing ε."""
    found = []
    for col in df.columns:
        if isinstance(col, str) and col.startswith(CURVE_PREFIX):
            try:
                found.append((parse_eps_label(col[len(CURVE_PREFIX):]), col))
            except ValueError:
                log.warning("ignoring column %r: no ε after %r", col, CURVE_PREFIX)
    return sorted(found)


def fronts_by_eps(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                  exclude_flagged: bool = False) -> dict[float, tuple[tuple[str, ...], pd.DataFrame]]:
    """One Pareto front per ε of the robustness curve: ``robust_acc`` in ``objectives`` is
    replaced by that ε's ``robust_acc@<eps>`` column. ε -> (objectives used, front rows)."""
    out = {}
    for eps, col in curve_columns(df):
        objs = tuple(col if o == "robust_acc" else o for o in objectives)
        out[eps] = (objs, pareto_front(df, objs, exclude_flagged=exclude_flagged))
    return out


# ---------------------------------------------------------------------------- merging runs

def merge_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One DataFrame of every trial in ``run_dirs`` (in CSV column order, with ``suspect``).

    A trial seen in several runs (same ``run_id`` and ``trial_id``, e.g. a resumed run passed
    next to its original) is kept once, the last one read winning, at the position of that
    last occurrence. A record without ``run_id`` is given its run directory's name, so that
    two runs whose trials are both called ``trial_0000`` are not mistaken for one."""
    rows: list[dict[str, Any]] = []
    for run_dir in map(Path, run_dirs):
        records = load_records(run_dir)
        log.info("%s: %d records", run_dir, len(records))
        for rec in records:
            row = rec.to_row()
            row["run_id"] = row["run_id"] or run_dir.name
            rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        before = len(df)
        df = df.drop_duplicates(subset=["run_id", "trial_id"], keep="last")
        if len(df) < before:
            log.info("dropped %d duplicate trials (same run_id and trial_id)", before - len(df))
    return with_suspect(df).reset_index(drop=True)


# ---------------------------------------------------------------------------- Pareto front

def objective_signs(objectives: Sequence[str]) -> np.ndarray:
    """+1 for an objective to maximize, -1 for one to minimize (``records.OBJECTIVES``; a
    curve column ``robust_acc@<eps>`` goes as ``robust_acc``, any other column is maximized)."""
    return np.array([-1.0 if OBJECTIVES.get(o.partition("@")[0]) == "minimize" else 1.0
                     for o in objectives])


def pareto_front(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 exclude_flagged: bool = False) -> pd.DataFrame:
    """The non-dominated rows of ``df``.

    Only candidates take part: rows with every objective non-NaN, ``status == "completed"``
    when a status column exists, and no raised ``flag.*`` when ``exclude_flagged``. Each
    objective goes in its own direction (``objective_signs``: accuracies up, ``cost`` down). A
    row is dominated when another candidate is at least as good in every objective and better
    in one, so exact duplicates of a front point are all kept.

    Returns a slice of ``df``: original index labels and original relative row order, all
    columns. Non-dominated sorting is moocore's ``is_nondominated`` (O(n log n) for 2 and 3
    objectives)."""
    candidates = _candidate_mask(df, objectives, exclude_flagged)
    keep = nondominated(_signed_matrix(df.loc[candidates], objectives))
    return df.loc[candidates].loc[keep]


def nondominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the maximal rows of an (n, k) array (every column maximized), keeping
    every copy of a duplicated maximal row."""
    import moocore

    points = np.asarray(points, dtype=float)
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    if points.shape[1] == 1:
        return points[:, 0] == points[:, 0].max()
    return np.asarray(moocore.is_nondominated(points, maximise=True, keep_weakly=True), dtype=bool)


def _candidate_mask(df: pd.DataFrame, objectives: Sequence[str],
                    exclude_flagged: bool) -> np.ndarray:
    mask = ~np.isnan(_objective_matrix(df, objectives)).any(axis=1)
    if "status" in df.columns:
        mask &= (df["status"] == COMPLETED).to_numpy()
    if exclude_flagged:
        mask &= ~flagged_mask(df).to_numpy()
    return mask


def _objective_matrix(df: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    objectives = list(objectives)
    if not objectives:
        raise ValueError("objectives must name at least one column")
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"objective columns {missing} not in the DataFrame "
                         f"(columns: {list(df.columns)})")
    return df[objectives].to_numpy(dtype=float, na_value=np.nan)


def _signed_matrix(df: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """The objectives with every one turned into one to maximize (a minimized one negated)."""
    return _objective_matrix(df, objectives) * objective_signs(objectives)


def ci_columns(objective: str) -> tuple[str, str]:
    """The interval columns of an accuracy column: ``robust_acc@0.1`` ->
    (``robust_acc_ci_low@0.1``, ``robust_acc_ci_high@0.1``)."""
    base, at, eps = objective.partition("@")
    return f"{base}_ci_low{at}{eps}", f"{base}_ci_high{at}{eps}"


def _interval_matrices(df: pd.DataFrame, objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(worst, best) ends of the objectives' intervals, signed as ``_signed_matrix``; a missing
    interval (``cost`` has none) is the point itself."""
    point = _objective_matrix(df, objectives)
    lows, highs = point.copy(), point.copy()
    for j, obj in enumerate(objectives):
        lo, hi = ci_columns(obj)
        if lo in df.columns and hi in df.columns:
            lows[:, j] = np.where(df[lo].isna(), point[:, j], df[lo].to_numpy(float, na_value=np.nan))
            highs[:, j] = np.where(df[hi].isna(), point[:, j], df[hi].to_numpy(float, na_value=np.nan))
    signs = objective_signs(objectives)
    lows, highs = lows * signs, highs * signs
    return np.minimum(lows, highs), np.maximum(lows, highs)


def front_layers(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 layers: int = 2, exclude_flagged: bool = False) -> pd.DataFrame:
    """The rows of the first ``layers`` non-dominated layers (non-dominated sorting: layer 2
    is the front of what remains once layer 1 is taken away)."""
    taken: list[pd.DataFrame] = []
    rest = df
    for _ in range(layers):
        layer = pareto_front(rest, objectives, exclude_flagged=exclude_flagged)
        if layer.empty:
            break
        taken.append(layer)
        rest = rest.drop(index=layer.index)
    return pd.concat(taken) if taken else df.iloc[:0]


def reaches_front(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                  exclude_flagged: bool = False) -> pd.Series:
    """True for candidates whose interval reaches the front: the upper corner of their
    intervals is dominated by no front member, so within the measurement's uncertainty they
    could be on it."""
    front = pareto_front(df, objectives, exclude_flagged=exclude_flagged)
    out = pd.Series(False, index=df.index)
    candidates = _candidate_mask(df, objectives, exclude_flagged)
    if front.empty or not candidates.any():
        return out
    _, highs = _interval_matrices(df.loc[candidates], objectives)
    points = _signed_matrix(front, objectives)
    dominated = ((points[None, :, :] >= highs[:, None, :]).all(2)
                 & (points[None, :, :] > highs[:, None, :]).any(2)).any(1)
    out.loc[df.index[candidates]] = ~dominated
    return out


def on_front_within_ci(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                       exclude_flagged: bool = False) -> pd.Series:
    """True for a trial off the front whose intervals overlap, in every objective, those of a
    front member that dominates it: the data cannot tell the two apart."""
    front = pareto_front(df, objectives, exclude_flagged=exclude_flagged)
    out = pd.Series(False, index=df.index)
    candidates = _candidate_mask(df, objectives, exclude_flagged) & ~df.index.isin(front.index)
    if front.empty or not candidates.any():
        return out
    sub = df.loc[candidates]
    lows, highs = _interval_matrices(sub, objectives)
    f_lows, f_highs = _interval_matrices(front, objectives)
    p, q = _signed_matrix(sub, objectives), _signed_matrix(front, objectives)
    dominates = (q[None] >= p[:, None]).all(2) & (q[None] > p[:, None]).any(2)
    overlap = ((lows[:, None] <= f_highs[None]) & (f_lows[None] <= highs[:, None])).all(2)
    out.loc[sub.index] = (dominates & overlap).any(1)
    return out


# ---------------------------------------------------------------------------- hypervolume

def hypervolume(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                reference: Sequence[float] | None = None) -> float:
    """Volume of objective space dominated by the rows of ``df`` and bounded by ``reference``
    (in the objectives' own units; default ``reference_point``).

    The single number that says whether one sweep's front beats another's (pass the same
    ``reference`` to both when an objective is minimized: its default depends on the data).
    Candidates are chosen as in :func:`pareto_front` (completed, no NaN); a point not strictly
    better than the reference in every objective bounds no volume and is ignored. Exact:
    moocore's ``hypervolume`` (O(n log n) in 2 and 3 dimensions)."""
    points = _objective_matrix(df.loc[_candidate_mask(df, objectives, False)], objectives)
    return points_hypervolume(points, objectives, reference)


def reference_point(points: np.ndarray, objectives: Sequence[str]) -> np.ndarray:
    """The default hypervolume reference: 0 for an objective to maximize (accuracies are ≥ 0),
    1.1 × the largest value among ``points`` for one to minimize (so the costliest point still
    bounds some volume; 1 when there are none)."""
    points = np.asarray(points, float).reshape(-1, len(objectives))
    worst = points.max(axis=0) * 1.1 if len(points) else np.ones(len(objectives))
    return np.where(objective_signs(objectives) < 0, worst, 0.0)


def points_hypervolume(points: np.ndarray, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                       reference: Sequence[float] | None = None) -> float:
    """``hypervolume`` of an (n, m) array of the ``objectives``' values (rows)."""
    import moocore

    points = np.asarray(points, float).reshape(-1, len(objectives))
    ref = reference_point(points, objectives) if reference is None else np.asarray(reference, float)
    if ref.shape != (points.shape[1],):
        raise ValueError(f"reference has {ref.size} values for {points.shape[1]} objectives")
    signs = objective_signs(objectives)
    points, ref = points * signs, ref * signs
    points = points[(points > ref).all(axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points.max() - ref[0])
    return float(moocore.hypervolume(points, ref=ref, maximise=True))


def front_summary(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                  exclude_flagged: bool = False) -> dict[str, Any]:
    """What a run's manifest says of its front: the objectives, the front's size, its knee and
    the hypervolume of the candidates with the reference it was taken from."""
    if df.empty:
        return {"objectives": list(objectives), "size": 0, "knee": None, "hypervolume": 0.0,
                "reference": None}
    pool = df[~flagged_mask(df)] if exclude_flagged else df
    front = pareto_front(pool, objectives)
    points = _objective_matrix(pool.loc[_candidate_mask(pool, objectives, False)], objectives)
    ref = reference_point(points, objectives)
    return {"objectives": list(objectives), "size": len(front),
            "knee": str(front.loc[knee(front, objectives), "trial_id"]) if not front.empty else None,
            "hypervolume": points_hypervolume(points, objectives, ref),
            "reference": [float(v) for v in ref]}


# ---------------------------------------------------------------------------- knee

def knee(front_df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> Hashable:
    """Index label of the knee of a front: the best-balanced trade-off to report.

    Each objective is min-max normalized to [0, 1] over the front (a constant objective
    becomes 0). In 2-D with 3+ points, the knee is the point farthest from the line through
    the two extreme points (max first objective, max second objective), counting only
    distance on the side of the ideal point (1, 1): a point bulging towards the origin is a
    poor trade-off, not a knee. When no point lies strictly beyond that line (1-2 points, a
    straight or concave front) or with other than 2 objectives, the knee is the point with the
    largest sum of normalized objectives. Ties go to the larger last objective (robust accuracy
    for the default ones), then the one before: the same front gives the same knee whatever
    order its rows come in (records are read in trial-id order, and ids are random)."""
    if front_df.empty:
        raise ValueError("knee of an empty front is undefined")
    points = _signed_matrix(front_df, objectives)
    span = points.max(axis=0) - points.min(axis=0)
    norm = np.divide(points - points.min(axis=0), span,
                     out=np.zeros_like(points), where=span > 0)
    score = norm.sum(axis=1)
    if norm.shape[1] == 2 and len(norm) >= 3:
        dist = _signed_distance_to_chord(norm)
        if dist.max() > 0:
            score = dist
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
    # among the tied: the largest last objective, then the one before (lexsort keys: last = primary)
    pick = best[np.lexsort(points[best].T)[-1]]
    return front_df.index[int(pick)]


def _signed_distance_to_chord(norm: np.ndarray) -> np.ndarray:
    """Distance of each 2-D point to the line through the extremes, positive on the side
    of the ideal point (1, 1); all zeros when the extremes coincide."""
    a = norm[np.lexsort((norm[:, 1], norm[:, 0]))[-1]]   # max x, then max y
    b = norm[np.lexsort((norm[:, 0], norm[:, 1]))[-1]]   # max y, then max x
    d = b - a
    length = float(np.hypot(*d))
    if length == 0.0:
        return np.zeros(len(norm))
    normal = np.array([d[1], -d[0]]) / length
    if normal @ (np.ones(2) - a) < 0:
        normal = -normal
    return (norm - a) @ normal
