"""Experiment tracking: each trial of a sweep as an MLflow run (the spec's ``tracking``).

One MLflow run per trial, named by its trial id (the row of trials.csv), in the experiment
``tracking.mlflow.experiment_name`` (default: the spec's name):

- params: the hyperparameters (``hp.<name>``) and what the trial was (defense, dataset, model,
  epochs, seed);
- per-epoch metrics, step = the epoch, while the trial trains (a Tune callback in the driver,
  so the workers need no access to the tracking store);
- the trial's trials.csv row (clean/robust accuracy, their intervals, per-attack accuracies,
  detector metrics, seconds) as metrics and its identity as tags (``trial_id``, ``status``,
  ``robust_attack``, ``final_attack``, ``checkpoint``), logged at every export; after the final
  re-evaluation a run's latest ``robust_acc`` is the final number, its history keeps the
  search-time one before it. A resumed sweep finds its runs by the ``trial_id`` tag.

Column names with characters MLflow refuses in keys (``@`` of ``robust_acc@0.1``) are written
with ``_at_``. MLflow is imported only when a spec asks for tracking.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from typing import Any, Iterable

from ray import tune

from orchestrator.cli import BadInput
from orchestrator.records import COMPLETED, FAILED, TrialRecord

log = logging.getLogger(__name__)

# Tune's own bookkeeping in a result (and the trial's): not metrics of the trial
_NOT_METRICS = {"epoch", "start_epoch", "timestamp", "time_this_iter_s", "time_total_s",
                "time_since_restore", "iterations_since_restore", "training_iteration", "pid",
                "done", "epochs"}
_IDENTITY_TAGS = ("defense", "status", "robust_attack", "final_attack", "checkpoint", "error",
                  "warning", "started_at", "finished_at", "cost_unit")
_MLFLOW_STATUS = {COMPLETED: "FINISHED", FAILED: "FAILED"}


def mlflow_key(name: str) -> str:
    """A column name as an MLflow key (letters, digits, ``_ - . / space``)."""
    return re.sub(r"[^\w\-./ ]", "_", name.replace("@", "_at_"))


def _numbers(items: Iterable[tuple[str, Any]]) -> dict[str, float]:
    out = {}
    for k, v in items:
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and not math.isnan(v) and not math.isinf(v):
            out[mlflow_key(k)] = float(v)
    return out


class MlflowTracker:
    """The MLflow side: one experiment, a run per trial id, found again on resume."""

    def __init__(self, tracking_uri: str, experiment_name: str, spec_fields: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment_name)
        self.spec_fields = spec_fields
        self._runs: dict[str, str] = {}

    def run_id(self, trial_id: str, defense: str, hp: dict[str, Any]) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        hits = self.client.search_runs([self.experiment_id], f"tags.trial_id = '{trial_id}'",
                                       max_results=1)
        if hits:
            run_id = hits[0].info.run_id
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=trial_id,
                                            tags={"trial_id": trial_id, "defense": defense}).info.run_id
            for key, value in {**self.spec_fields, "defense": defense,
                               **{f"hp.{k}": v for k, v in sorted(hp.items())}}.items():
                self.client.log_param(run_id, mlflow_key(key), value)
        self._runs[trial_id] = run_id
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_records(self, records: Iterable[TrialRecord]) -> None:
        """Each finished trial's trials.csv row; the run ends with the trial's status."""
        for rec in records:
            if rec.status not in _MLFLOW_STATUS:
                continue
            run_id = self.run_id(rec.trial_id, rec.defense, rec.hp)
            row = rec.to_row()
            self.log_metrics(run_id, _numbers((k, v) for k, v in row.items() if k not in _NOT_METRICS),
                             rec.epochs + (1 if rec.final_evaluated else 0))
            for key in _IDENTITY_TAGS:
                self.client.set_tag(run_id, key, str(row.get(key, "") or ""))
            self.client.set_tag(run_id, "final_evaluated", str(rec.final_evaluated))
            self.client.set_terminated(run_id, _MLFLOW_STATUS[rec.status])


def log_records_safely(tracker: MlflowTracker, run_dir) -> None:
    """``tracker.log_records`` of every record in ``run_dir``; a store that fails mid-sweep
    (a tracking server gone) is logged, never the end of the sweep: the CSVs are the record."""
    from orchestrator.records import load_records

    try:
        tracker.log_records(load_records(run_dir))
    except Exception as e:
        log.error("MLflow tracking: records not logged: %s", e)


class TrackingCallback(tune.Callback):
    """Per-epoch metrics of the sweep's trials into their MLflow runs."""

    def __init__(self, tracker: MlflowTracker):
        self.tracker = tracker

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "record" in result or "epoch" not in result:
            return  # the final record is logged from the records (log_records)
        try:
            run_id = self.tracker.run_id(trial.trial_id, trial.config.get("defense", ""),
                                         dict(trial.config.get("hp", {})))
            self.tracker.log_metrics(run_id, _numbers((k, v) for k, v in result.items()
                                                      if k not in _NOT_METRICS), int(result["epoch"]))
        except Exception as e:  # see log_records_safely
            log.error("MLflow tracking: epoch %s of %s not logged: %s", result["epoch"], trial.trial_id, e)


class TrackingError(BadInput):
    """The spec's tracking store cannot be used (exit code 2, before Ray starts)."""


def make_tracker(spec) -> MlflowTracker | None:
    """The spec's tracker (its experiment opened, or created), or None when it asks for none.
    Called before Ray starts: a store that cannot be opened is a TrackingError."""
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is None:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError("spec error at tracking.mlflow: MLflow is not installed; "
                            "pip install mlflow-skinny (or leave tracking out)")
    fields = {"dataset": spec.dataset, "model": spec.model, "epochs": spec.epochs, "seed": spec.seed,
              "sweep": spec.name}
    try:
        return MlflowTracker(mlflow.tracking_uri, mlflow.experiment_name or spec.name, fields)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"spec error at tracking.mlflow.tracking_uri: MLflow cannot open "
                            f"{mlflow.tracking_uri!r}: {first}") from None
