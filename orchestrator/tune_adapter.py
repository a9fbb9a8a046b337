"""What connects ``run_trial`` to Ray Tune: the function trainable, its reporter, the
callback that writes each trial's record, and the registry of search algorithms."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ray import tune

from orchestrator.records import FAILED, TrialRecord, save_record
from orchestrator.spec import SweepSpec
from orchestrator.trial import run_trial

log = logging.getLogger(__name__)


class TuneReporter:
    """Reports into the Tune session; checkpoints go to Tune's storage with the result."""

    def __init__(self) -> None:
        self.trial_id = tune.get_context().get_trial_id()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def restore(self) -> Path | None:
        checkpoint = tune.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def tune_trial(config: dict[str, Any], defense: str, spec: dict[str, Any], run_dir: str,
               run_id: str) -> None:
    """The Tune function trainable: the search algorithm fills ``config["hp"]``."""
    logging.basicConfig(level=logging.INFO)
    run_trial({"defense": defense, "hp": config["hp"], "spec": spec, "run_dir": run_dir,
               "run_id": run_id}, reporter=TuneReporter())


class RecordWriter(tune.Callback):
    """Writes each trial's final record into RUN_DIR/records, with its checkpoint path; a
    trial that crashed before reporting a record gets a failed record from its error."""

    def __init__(self, run_dir: Path, spec: SweepSpec, run_id: str):
        self.run_dir, self.spec, self.run_id = Path(run_dir), spec, run_id
        self.defense = ""
        self._final: dict[str, TrialRecord] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "record" in result:
            record = TrialRecord.from_dict(result["record"])
            record.trial_id = trial.trial_id
            self._final[trial.trial_id] = record
            save_record(self.run_dir, record)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # The final checkpoint is persisted just after the final result: point the record at it.
        record = self._final.get(trial.trial_id)
        if record is not None:
            record.checkpoint = checkpoint.path
            save_record(self.run_dir, record)

    def on_trial_error(self, iteration, trials, trial, **info):
        record = self._final.get(trial.trial_id)
        if record is None or record.status != FAILED:
            from orchestrator.dashboard import error_reason
            record = TrialRecord(
                trial_id=trial.trial_id, defense=self.defense, dataset=self.spec.dataset,
                model=self.spec.model, seed=self.spec.seed, hp=dict(trial.config.get("hp", {})),
                status=FAILED, error=error_reason(trial), run_id=self.run_id)
            self._final[trial.trial_id] = record
            save_record(self.run_dir, record)


def _samplers() -> dict[str, Callable[[int], Any]]:
    """The registry of search algorithms (the spec's ``search``): Optuna samplers by name."""
    import optuna

    return {
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    }


def make_searcher(spec: SweepSpec, defense: str, run_dir: Path):
    """OptunaSearch over both objectives, its study kept in RUN_DIR/optuna.db (one study per
    defense) so optuna-dashboard can open it and a resumed sweep continues its history."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(run_dir).resolve() / 'optuna.db'}")
    return OptunaSearch(metric=list(spec.objectives), mode=["max"] * len(spec.objectives),
                        sampler=_samplers()[spec.search](spec.seed), study_name=f"{spec.name}-{defense}",
                        storage=storage, seed=spec.seed)
