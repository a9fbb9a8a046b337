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

from orchestrator.records import COMPLETED, IDENTITY_COLUMNS, load_records

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

def pareto_front(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 maximize: bool | Sequence[bool] = True,
                 exclude_flagged: bool = False) -> pd.DataFrame:
    """The non-dominated rows of ``df``.

    Only candidates take part: rows with every objective non-NaN, ``status == "completed"``
    when a status column exists, and no raised ``flag.*`` when ``exclude_flagged``. A row is
    dominated when another candidate is >= in every objective and > in at least one, so exact
    duplicates of a front point are all kept. ``maximize`` is one bool for all objectives or
    one per objective (False = minimize).

    Returns a slice of ``df``: original index labels and original relative row order, all
    columns. 2 objectives use an O(n log n) sort sweep, others a vectorized filter."""
    candidates = _candidate_mask(df, objectives, exclude_flagged)
    points = _objective_matrix(df.loc[candidates], objectives)
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    if signs.size not in (1, points.shape[1]):
        raise ValueError(f"maximize has {signs.size} values for {points.shape[1]} objectives")
    points = points * signs
    keep = _nondominated_2d(points) if points.shape[1] == 2 else _nondominated_kd(points)
    return df.loc[candidates].loc[keep]


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


def _nondominated_2d(points: np.ndarray) -> np.ndarray:
    """Boolean mask of maximal points of an (n, 2) array by one sort.

    Sorted by x then y ascending, a point is non-dominated iff it has the largest y of its
    x-group (no equal-x point above it) and a y strictly above every point with larger x
    (the group with the largest x has no such points)."""
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    x, y = points[:, 0], points[:, 1]
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    new_group = xs[1:] != xs[:-1]
    gid = np.concatenate(([0], np.cumsum(new_group)))
    last_of_group = np.concatenate((new_group, [True]))
    gmax = ys[last_of_group]
    best_right = np.maximum.accumulate(gmax[::-1])[::-1]           # max y over groups >= g
    above_right = np.concatenate((best_right[1:], [-np.inf]))      # max y over groups > g
    is_last_group = gid == gid[-1]
    keep_sorted = (ys == gmax[gid]) & (is_last_group | (ys > above_right[gid]))
    keep = np.empty(n, dtype=bool)
    keep[order] = keep_sorted
    return keep


def _nondominated_kd(points: np.ndarray) -> np.ndarray:
    """Boolean mask of maximal points of an (n, k) array, any k.

    Each surviving point in turn removes every point it strictly dominates; points that are
    non-dominated are never removed, so each dominated point is removed by one of them.
    Visiting by descending sum first makes early points remove the most."""
    n = len(points)
    order = np.argsort(-points.sum(axis=1), kind="stable")
    alive = order.copy()                      # original indices still in the running
    pos = 0
    while pos < len(alive):
        p = points[alive[pos]]
        rest = points[alive]
        dominated = (rest <= p).all(axis=1) & (rest < p).any(axis=1)
        pos -= int(dominated[:pos].sum())      # keep pointing just past p after removals
        alive = alive[~dominated]
        pos += 1
    keep = np.zeros(n, dtype=bool)
    keep[alive] = True
    return keep


def ci_columns(objective: str) -> tuple[str, str]:
    """The interval columns of an accuracy column: ``robust_acc@0.1`` ->
    (``robust_acc_ci_low@0.1``, ``robust_acc_ci_high@0.1``)."""
    base, at, eps = objective.partition("@")
    return f"{base}_ci_low{at}{eps}", f"{base}_ci_high{at}{eps}"


def _interval_matrices(df: pd.DataFrame, objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lows, highs) of the objectives' intervals; a missing interval is the point itself."""
    point = _objective_matrix(df, objectives)
    lows, highs = point.copy(), point.copy()
    for j, obj in enumerate(objectives):
        lo, hi = ci_columns(obj)
        if lo in df.columns and hi in df.columns:
            lows[:, j] = np.where(df[lo].isna(), point[:, j], df[lo].to_numpy(float, na_value=np.nan))
            highs[:, j] = np.where(df[hi].isna(), point[:, j], df[hi].to_numpy(float, na_value=np.nan))
    return lows, highs


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
    points = _objective_matrix(front, objectives)
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
    p, q = _objective_matrix(sub, objectives), _objective_matrix(front, objectives)
    dominates = (q[None] >= p[:, None]).all(2) & (q[None] > p[:, None]).any(2)
    overlap = ((lows[:, None] <= f_highs[None]) & (f_lows[None] <= highs[:, None])).all(2)
    out.loc[sub.index] = (dominates & overlap).any(1)
    return out


# ---------------------------------------------------------------------------- hypervolume

def hypervolume(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                reference: Sequence[float] | None = None) -> float:
    """Volume of objective space dominated by the rows of ``df`` and bounded below by
    ``reference`` (all objectives maximized; default reference: the origin).

    The single number that says whether one sweep's front beats another's. Candidates are
    chosen as in :func:`pareto_front` (completed, no NaN); a point not strictly better than
    the reference in every objective bounds no volume and is ignored. Exact: a sort sweep in
    2-D, recursive slicing along the last objective otherwise (fine for fronts of hundreds)."""
    return points_hypervolume(_objective_matrix(df.loc[_candidate_mask(df, objectives, False)],
                                                objectives), reference)


def points_hypervolume(points: np.ndarray, reference: Sequence[float] | None = None) -> float:
    """``hypervolume`` of an (n, m) array of objective values (rows, all maximized)."""
    points = np.asarray(points, float)
    ref = np.zeros(points.shape[1]) if reference is None else np.asarray(reference, float)
    if ref.shape != (points.shape[1],):
        raise ValueError(f"reference has {ref.size} values for {points.shape[1]} objectives")
    points = points[(points > ref).all(axis=1)]
    return float(_hv(points, ref))


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points.max() - ref[0])
    if points.shape[1] == 2:
        return _hv_2d(points, ref)
    points = points[_nondominated_kd(points)]
    points = points[np.argsort(-points[:, -1], kind="stable")]
    z = points[:, -1]
    heights = z - np.concatenate((z[1:], ref[-1:]))     # slab between consecutive z levels
    return float(sum(_hv(points[: i + 1, :-1], ref[:-1]) * h
                     for i, h in enumerate(heights) if h > 0))


def _hv_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Sweep by x descending: each point adds the strip between the best y so far and its
    own y (if higher), as wide as its distance to the reference in x."""
    order = np.lexsort((-points[:, 1], -points[:, 0]))
    x, y = points[order, 0], points[order, 1]
    best_y = np.maximum.accumulate(y)
    gain = np.diff(np.concatenate(([ref[1]], best_y)))
    return float(np.sum((x - ref[0]) * gain))


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
    points = _objective_matrix(front_df, objectives)
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
