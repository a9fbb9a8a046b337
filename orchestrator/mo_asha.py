"""Multi-objective asynchronous successive halving as a Ray Tune scheduler.

Schmucker, Donini, Zafar, Salinas, Archambeau (2021), "Multi-objective Asynchronous
Successive Halving" (arXiv:2106.12639): ASHA (Li et al. 2020) with its one-metric rung
decision replaced by a ranking of the trials recorded at a rung on several objectives.
Here: rungs at ``grace_period · reduction_factor^k`` epochs below the trial's last one; a
trial that reports a rung's epoch is recorded there and goes on only if it ranks in the top
``ceil(n / reduction_factor)`` of the ``n`` trials recorded at that rung so far (itself
included), as Ray's ``AsyncHyperBandScheduler`` cuts at the ``1 − 1/reduction_factor``
quantile. The ranking: non-dominated sorting (``moocore.pareto_rank``; accuracies maximized,
``val.cost``, the device-seconds so far, minimized), within a layer by NSGA-II's crowding
distance, largest first (the paper's alternatives are an ε-net or the hypervolume contribution; crowding keeps a layer's extremes
first, so a trial that is best on one objective is never stopped while it is in the first
layer). Decisions are asynchronous: a trial is judged against the rung as it is when it
arrives, never waits for others, and is never promoted later.

``keep_nondominated`` (a deviation from the paper, on by default): a trial that no trial
recorded at its rung dominates goes on too, wherever the crowding order puts it. The paper's
cut is a share of a total order, so among mutually non-dominated trials it stops the ones the
tie-break ranks last; with two conflicting objectives that is often a trial on the rung's
front, the best there on neither objective alone. Replayed on recorded B7 learning curves
(``bench.b7_replay``, BENCHMARKS), keeping them raised the finished front's hypervolume at a
few points more trial-seconds.

The objectives are the trial's per-epoch validation numbers (``orchestrator.trial``:
``val.clean_acc`` and ``val.robust_acc``, APGD-CE-10 on held-out training images, and
``val.cost`` when cost is an objective), not its final test-set evaluation, which runs only
once a trial has trained every epoch."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.aggregate import nondominated

log = logging.getLogger(__name__)


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row of ``points`` (one layer): the sum over the
    objectives of the normalized gap between its two neighbours; each objective's extremes
    get infinity."""
    n, m = points.shape
    out = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(points[:, j], kind="stable")
        span = points[order[-1], j] - points[order[0], j]
        out[order[0]] = out[order[-1]] = np.inf
        if span > 0:
            out[order[1:-1]] += (points[order[2:], j] - points[order[:-2], j]) / span
    return out


def rank_order(points: np.ndarray) -> np.ndarray:
    """Indices of ``points`` (rows, every objective maximized), best first: by non-dominated
    layer, then by crowding distance within the layer (largest first), then by index."""
    import moocore

    points = np.asarray(points, dtype=float)
    layers = moocore.pareto_rank(points, maximise=True)
    crowd = np.zeros(len(points))
    for layer in np.unique(layers):
        members = np.flatnonzero(layers == layer)
        crowd[members] = crowding_distance(points[members])
    return np.lexsort((np.arange(len(points)), -crowd, layers))


class MOASHA(FIFOScheduler):
    """Stops a trial at a rung where it does not rank in the top 1/``reduction_factor`` of the
    trials recorded there on ``objectives`` (result keys, each maximized or, where ``mode``
    says "min", minimized). ``max_t``: the trials' last epoch (no rung there: a trial that
    gets that far finishes)."""

    def __init__(self, objectives: Sequence[str], max_t: int, grace_period: int = 1,
                 reduction_factor: float = 3.0, time_attr: str = "epoch",
                 mode: Sequence[str] | None = None, keep_nondominated: bool = True):
        super().__init__()
        if reduction_factor < 2 or grace_period < 1 or grace_period >= max_t:
            raise ValueError(f"MOASHA needs reduction_factor ≥ 2 and 1 ≤ grace_period < max_t; got "
                             f"{reduction_factor}, {grace_period}, {max_t}")
        self.objectives, self.time_attr, self.reduction_factor = list(objectives), time_attr, reduction_factor
        self.keep_nondominated = keep_nondominated
        self.signs = np.array([-1.0 if m == "min" else 1.0 for m in (mode or ["max"] * len(objectives))])
        rungs, t = [], float(grace_period)
        while t < max_t:
            rungs.append(int(round(t)))
            t *= reduction_factor
        self.rungs = sorted(set(rungs))
        self.recorded: dict[int, dict[str, tuple[float, ...]]] = {r: {} for r in self.rungs}
        self.stopped: dict[str, int] = {}  # trial id -> the rung it was stopped at

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler a sweep began with: one pickled before
        # keep_nondominated existed goes on with the rule it began with, the paper's cut alone
        self.__dict__.update({"keep_nondominated": False, **state})

    def decide(self, trial_id: str, rung: int, values: Sequence[float]) -> str:
        """Record ``values`` at ``rung`` for ``trial_id``; CONTINUE or STOP."""
        at = self.recorded[rung]
        at[trial_id] = tuple(float(v) for v in values)
        ids = list(at)
        points = np.array([at[i] for i in ids]) * self.signs
        i = ids.index(trial_id)
        position = int(np.flatnonzero(rank_order(points) == i)[0])
        if position < math.ceil(len(ids) / self.reduction_factor) or \
                (self.keep_nondominated and nondominated(points)[i]):
            return TrialScheduler.CONTINUE
        self.stopped[trial_id] = rung
        log.info("mo_asha: trial %s stopped at epoch %d (rank %d of %d there)", trial_id, rung,
                 position + 1, len(ids))
        return TrialScheduler.STOP

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epoch = result.get(self.time_attr)
        if epoch not in self.recorded or trial.trial_id in self.recorded[epoch]:
            return TrialScheduler.CONTINUE
        values = [result.get(k) for k in self.objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return TrialScheduler.CONTINUE  # nothing to judge it on (a trial resumed from its final checkpoint)
        return self.decide(trial.trial_id, epoch, values)

    def debug_string(self) -> str:
        return "MOASHA: " + ", ".join(f"epoch {r}: {len(v)} recorded" for r, v in self.recorded.items())
