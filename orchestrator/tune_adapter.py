"""What connects ``run_trial`` to Ray Tune (and, for data-parallel trials, to Ray Train): the
function trainable, its reporters, the callback that writes each trial's record, and the
registry of search algorithms.

A trial with ``resources.workers_per_trial > 1`` runs its training as a Ray Train
``TorchTrainer`` launched from the Tune trial function (``run_data_parallel``). The trial
function itself holds no CPU (it only waits), the trainer reserves one placement group for its
workers; each worker runs the same ``run_trial`` with a ``TorchDistributed`` (see
orchestrator/distributed.py). Rank 0's reports and checkpoints are forwarded to Tune as they
come, so Tune holds a real checkpoint for every epoch: a retried or restored trial resumes from
it exactly as a one-worker trial does."""
from __future__ import annotations

import logging
import math
import os
import pickle
import statistics
import threading
import time
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.fs
import torch
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.records import (FAILED, RUNNING, STOPPED, TrialRecord, iso_utc,
                                  load_record, record_path, save_record, tune_modes)
from orchestrator.spec import SweepSpec
from orchestrator.trial import final_metrics, new_record, run_trial
from orchestrator.training import CHECKPOINT_FILE

log = logging.getLogger(__name__)


class TuneReporter:
    """Reports into the Tune session; checkpoints go to Tune's storage with the result."""

    def __init__(self) -> None:
        self.trial_id = tune.get_context().get_trial_id()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def restore(self) -> Path | None:
        checkpoint, skipped = latest_checkpoint()
        if skipped:
            self.warning = (f"unreadable checkpoint(s) skipped on resume ({', '.join(skipped)}): "
                            + (f"resumed from {checkpoint.path}" if checkpoint else "restarted from epoch 0"))
            log.warning("trial %s: %s", self.trial_id, self.warning)
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def latest_checkpoint() -> tuple[tune.Checkpoint | None, list[str]]:
    """The newest readable checkpoint this trial persisted, else Tune's.

    Tune knows a trial's checkpoints from its experiment state, saved every ~10 s; a driver
    killed in between restores trials whose newest checkpoints it does not know (an
    interrupted trial would start over, a finished one would be evaluated again). The trial's
    folder in the storage does know them: the newest file wins (Tune reuses checkpoint names
    after such a restore, so names do not order them), a truncated copy (a node that died
    while writing it) is passed over for the previous kept one, and with none readable the
    trial starts over. Returns the checkpoint (None: start over) and the paths skipped."""
    known = tune.get_checkpoint()
    skipped: list[str] = []
    try:
        storage = tune.get_context().get_storage()
        fs, root = storage.storage_filesystem, storage.trial_fs_path
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        files = [fs.get_file_info(f"{e.path}/{CHECKPOINT_FILE}") for e in entries
                 if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    except (OSError, AttributeError, ValueError) as e:
        log.warning("cannot list this trial's checkpoints (%s); using Tune's", e)
        files = []
    files = [f for f in files if f.type == pyarrow.fs.FileType.File]
    for f in sorted(files, key=lambda f: f.mtime_ns or 0, reverse=True):
        candidate = tune.Checkpoint(f.path.rsplit("/", 1)[0], fs)
        if f.size and _readable(candidate):
            return candidate, skipped
        skipped.append(candidate.path)
    if known is not None and known.path not in skipped and not _readable(known):
        skipped.append(known.path)
    return (None if known is None or known.path in skipped else known), skipped


def _readable(checkpoint: tune.Checkpoint) -> bool:
    try:
        with checkpoint.as_directory() as d:
            torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        return True
    except Exception as e:  # a copy cut short by a kill: EOF, unpickling errors, ...
        log.warning("skipping unreadable checkpoint %s: %s", checkpoint.path, e)
        return False


def tune_trial(config: dict[str, Any], spec: dict[str, Any], run_dir: str, run_id: str,
               storage: str = "") -> None:
    """The Tune function trainable: the search algorithm (``DefenseRouter``) fills
    ``config["defense"]`` and ``config["hp"]``. ``storage``: where data-parallel trials keep
    their Ray Train runs (the sweep's storage path)."""
    logging.basicConfig(level=logging.INFO)
    defense = config["defense"]
    trial = {"defense": defense, "hp": config["hp"], "spec": spec, "run_dir": run_dir, "run_id": run_id}
    parsed = SweepSpec.model_validate(spec)
    if parsed.resources_for(defense).workers_per_trial > 1:
        run_data_parallel(trial, parsed, storage or str(Path(run_dir) / "tune"))
    else:
        run_trial(trial, reporter=TuneReporter())


# ------------------------------------------------------------------ data-parallel trials
class TrainReporter:
    """Reports from one Ray Train worker. Every rank reports (Ray Train's report is a barrier
    across ranks); only rank 0 passes a checkpoint. Resumes from the run's own latest
    checkpoint, else from the Tune checkpoint the trial was restarted with."""

    def __init__(self, trial_id: str, resume_from: tune.Checkpoint | None):
        self.trial_id = trial_id
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restore(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint() or self.resume_from
        return Path(checkpoint.to_directory()) if checkpoint is not None else None


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: ``run_trial`` as one rank."""
    import ray.train
    import ray.train.torch

    from orchestrator.distributed import TorchDistributed

    logging.basicConfig(level=logging.INFO)
    r = SweepSpec.model_validate(config["spec"]).resources_for(config["defense"])
    device = ray.train.torch.get_device() if r.gpus_per_trial > 0 else torch.device("cpu")
    run_trial(config, reporter=TrainReporter(config["trial_id"], config.get("resume_from")),
              parallel=TorchDistributed(device, sync_batchnorm=r.sync_batchnorm))


def _forward_to_tune_callback(queue):
    from ray.train import UserCallback

    class ForwardToTune(UserCallback):
        """Runs in the Ray Train controller: hands rank 0's metrics (already reduced over the
        ranks) and the persisted checkpoint to the Tune trial function. The queue holds one
        item, so training waits while Tune copies the previous checkpoint."""

        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint))

    return ForwardToTune()


TRAIN_POLL_INTERVAL_S = 0.2


def poll_train_workers_often() -> None:
    """Ray Train's controller polls its workers every 2 s by default, and the end of training
    is only seen at a poll: ~2 s of every trial were spent waiting (B3 in BENCHMARKS.md). Ray
    Train propagates this variable from the process calling ``fit()`` to its controller; a
    user's own setting wins."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))


_relay: Any = None  # this process's relay queue, kept across the trials of a reused Tune actor


def _relay_queue() -> Any:
    """The queue that carries rank 0's reports from the Train controller to this trial
    function. A queue is an actor, i.e. a process to start (~1 s); Tune reuses the trial
    function's actor across trials, so the queue is kept too, emptied of anything a failed run
    left in it."""
    from ray.util.queue import Empty, Queue

    global _relay
    if _relay is not None:
        try:
            while True:
                _relay.get_nowait()
        except Empty:
            return _relay
        except Exception as e:  # the queue's actor died (its node went away): start another
            log.warning("relay queue lost (%s); starting a new one", e)
    _relay = Queue(maxsize=1, actor_options={"num_cpus": 0})
    return _relay


def run_data_parallel(trial: dict[str, Any], spec: SweepSpec, storage: str) -> None:
    """Train one trial with a ``TorchTrainer`` of ``workers_per_trial`` workers, from inside a
    Tune trial function, relaying its reports and checkpoints to Tune."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty

    r = spec.resources_for(trial["defense"])
    trial_id = tune.get_context().get_trial_id()
    use_gpu = r.gpus_per_trial > 0
    poll_train_workers_often()
    queue = _relay_queue()
    name = f"{trial_id}-{uuid.uuid4().hex[:6]}"  # one Train run per attempt: no stale state
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**trial, "trial_id": trial_id, "resume_from": latest_checkpoint()[0]},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers_per_trial, use_gpu=use_gpu,
            resources_per_worker={"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=f"{storage.rstrip('/')}/_train",
            # retries belong to Tune (the sweep's max_failures), which restarts from its checkpoint
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_forward_to_tune_callback(queue)]))
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the trial function's thread below
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    worker.start()
    last_epoch = 0
    while worker.is_alive() or not queue.empty():
        try:
            metrics, checkpoint = queue.get(timeout=0.5)
        except Empty:
            continue
        last_epoch = int(metrics.get("epoch", last_epoch))
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
                    if checkpoint is not None else None)
    worker.join()
    _delete_train_run(f"{storage.rstrip('/')}/_train/{name}")
    error = outcome.get("error")
    if error is None:
        return
    diverged = _find_cause(error, "TrainingDiverged")
    if diverged is None:
        raise error
    # deterministic, as in one process: the trial ends failed without a retry, the sweep goes on
    record = new_record(trial, spec, trial_id)
    record.status, record.error, record.epochs = FAILED, str(diverged), last_epoch
    tune.report(final_metrics(record, spec.epochs))


def _find_cause(error: BaseException, type_name: str) -> BaseException | None:
    """The exception of class ``type_name`` that ``error`` (a Ray Train failure, which holds
    each worker's exception, possibly wrapped) comes from, if any."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == type_name:
            return e
        todo.extend(getattr(e, "worker_failures", {}).values())
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def _delete_train_run(uri: str) -> None:
    """Tune holds copies of the checkpoints; the Train run's own folder is scratch."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.delete_dir(path)
    except (OSError, ValueError) as e:
        log.warning("could not delete the scratch Train run %s: %s", uri, e)


class RecordWriter(tune.Callback):
    """Writes each trial's final record into RUN_DIR/records, with its checkpoint path; a
    trial that crashed before reporting a record gets a failed record from its error."""

    def __init__(self, run_dir: Path, spec: SweepSpec, run_id: str):
        self.run_dir, self.spec, self.run_id = Path(run_dir), spec, run_id
        self._final: dict[str, TrialRecord] = {}

    def _record_of(self, trial, status: str, error: str, **fields: Any) -> TrialRecord:
        """A record for a trial that ended without reporting its own (failed or stopped)."""
        return TrialRecord(
            trial_id=trial.trial_id, defense=trial.config.get("defense", ""), dataset=self.spec.dataset,
            model=self.spec.model, seed=self.spec.seed, hp=dict(trial.config.get("hp", {})),
            status=status, error=error, run_id=self.run_id, finished_at=iso_utc(), **fields)

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
            record.checkpoint = checkpoint_uri(checkpoint)
            save_record(self.run_dir, record)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # a trial the scheduler stopped ends after an epoch report, without a final record
        last = trial.last_result or {}
        if trial.trial_id in self._final or last.get("status") != RUNNING:
            return
        record = self._record_of(
            trial, STOPPED, f"stopped early by the scheduler after epoch {last.get('epoch')}",
            epochs=int(last.get("epoch", 0)), train_seconds=float(last.get("train_seconds", 0.0)),
            eval_seconds=float(last.get("val_seconds", 0.0)), started_at=str(last.get("started_at", "")),
            cost=float(last.get("cost", math.nan)), cost_unit=str(last.get("cost_unit", "")),
            metrics={k: float(v) for k, v in last.items() if k.startswith("val.")})
        if trial.checkpoint is not None:
            record.checkpoint = checkpoint_uri(trial.checkpoint)
        self._final[trial.trial_id] = record
        save_record(self.run_dir, record)

    def on_trial_error(self, iteration, trials, trial, **info):
        record = self._final.get(trial.trial_id)
        if record is None or record.status != FAILED:
            from orchestrator.dashboard import error_reason
            record = self._record_of(trial, FAILED, error_reason(trial))
            self._final[trial.trial_id] = record
        # how many times it ran and failed: 1 + the retries FailureConfig allowed
        record.metrics = {**record.metrics, "failures": float(trial.num_failures)}
        save_record(self.run_dir, record)


def checkpoint_uri(checkpoint) -> str:
    """A checkpoint's location as a user can open it: a path, or scheme://path off this machine."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the objective: Optuna's 10, but at most a third of a
    small budget (at 20 trials, Optuna's default leaves TPE half of the study)."""
    return min(10, max(3, n_trials // 3))


def population_size(n_trials: int) -> int:
    """NSGA-II's generation size: Optuna's 50, but small enough for 4+ generations in the
    budget (with 50, a 20-trial study never leaves its random first generation)."""
    return min(50, max(4, n_trials // 4))


def _samplers() -> dict[str, Callable[[int, int], Any]]:
    """The registry of search algorithms (the spec's ``search``): Optuna samplers by name,
    built as ``factory(seed, n_trials)`` so that the model-based ones size their random start
    to the study's trial budget."""
    import optuna

    return {
        "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                         n_startup_trials=startup_trials(n)),
        "nsga2": lambda seed, n: PicklableNSGAIISampler(seed=seed, population_size=population_size(n)),
        "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    }


def study_name(spec: SweepSpec, defense: str) -> str:
    return f"{spec.name}-{defense}"


def optuna_storage(run_dir: Path):
    import optuna

    return optuna.storages.RDBStorage(f"sqlite:///{Path(run_dir).resolve() / 'optuna.db'}")


def _study(spec: SweepSpec, defense: str, run_dir: Path):
    """``defense``'s study in RUN_DIR/optuna.db, or None (no database, another search)."""
    import optuna

    if not (Path(run_dir) / "optuna.db").is_file():
        return None
    try:
        return optuna.load_study(study_name=study_name(spec, defense), storage=optuna_storage(run_dir))
    except KeyError:  # no study under that name (e.g. another search algorithm)
        return None


def close_orphan_trials(spec: SweepSpec, defense: str, run_dir: Path) -> int:
    """Mark FAIL the Optuna trials of ``defense``'s study still RUNNING once its Tuner has
    finished every trial. A driver killed after asking for a configuration (stored at once in
    SQLite) but before Tune saved its searcher state leaves such a trial: the resumed searcher
    asks again, and the orphan would otherwise stay RUNNING forever. Returns how many."""
    import optuna

    study = _study(spec, defense, run_dir)
    if study is None:
        return 0
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    if orphans:
        log.warning("%s: %d Optuna trial(s) left RUNNING by an interrupted driver marked FAIL "
                    "(their configurations were asked again after the resume)", defense, len(orphans))
    return len(orphans)


def make_searcher(spec: SweepSpec, defense: str, run_dir: Path):
    """``defense``'s OptunaSearch over the sweep's objectives and its search space
    (``{"hp": ...}``), its study kept in RUN_DIR/optuna.db (one study per defense) so
    optuna-dashboard can open it and a resumed sweep continues its history; each Optuna trial
    names the sweep's trial, its record and its checkpoint (``RecordedSearch``)."""
    from orchestrator.spec import build_space

    # one seed per defense: with the spec's seed alone every study would draw the same first
    # points of its unit cube (the same lr quantile for every defense, ...)
    seed = (spec.seed * 1_000_003 + zlib.crc32(defense.encode())) % 2**31
    return RecordedSearch(
        space=OptunaSearch.convert_search_space({"hp": build_space(spec, defense)}),
        metric=list(spec.objectives), mode=tune_modes(spec.objectives),
        sampler=_samplers()[spec.search](seed, spec.trials_for(defense)),
        study_name=study_name(spec, defense), storage=optuna_storage(run_dir), run_dir=run_dir)


def make_router(spec: SweepSpec, run_dir: Path) -> "DefenseRouter":
    """The sweep's search algorithm: every defense's searcher behind one ``DefenseRouter``."""
    from orchestrator.records import trial_seconds_by_defense

    try:
        prior = trial_seconds_by_defense(spec.cost_prior) if spec.cost_prior else {}
    except ValueError as e:  # gone since the spec was parsed (a resumed run's): a hint, not a need
        log.warning("cost_prior ignored: %s", e)
        prior = {}
    return DefenseRouter({d: make_searcher(spec, d, run_dir) for d in spec.defenses},
                         {d: spec.trials_for(d) for d in spec.defenses},
                         {d: spec.resources_for(d).max_concurrent for d in spec.defenses},
                         adaptive=spec.allocation == "adaptive", objectives=spec.objectives,
                         longest_first=spec.start_order == "longest_first", prior=prior)


class DefenseRouter(Searcher):
    """One Tune run for the whole sweep, so that the trials of every defense share the
    cluster's slots at once: each ``suggest`` picks the defense of the next trial, asks that
    defense's own searcher (its Optuna study) for a configuration and returns
    ``{"defense": d, "hp": ...}``; results and completions go back to the searcher that made
    the suggestion. Each study thus learns only from its own defense, as when every defense
    had its own Tune run.

    The pick (``allocation: fixed``): the defense with the smallest share of its trial budget
    suggested so far, ties in the spec's order. Defenses interleave in proportion to their
    budgets, so a cluster's first slots hold trials of every defense and no defense waits for
    another's slowest trial. A defense at its own ``max_concurrent`` running trials is passed
    over until one ends (with every open defense there, Tune is told to ask later).

    ``start_order: longest_first``: among the defenses that may get the trial, the one whose
    trials are expected to run longest goes first (list scheduling's "longest processing
    time first": the sweep's last wave then holds short trials, not a long one that leaves
    the other slots idle). Expected, per defense, from the seconds its trials of this sweep
    took (from suggestion to completion) and the longest one still running: the larger of
    their mean and that one's seconds so far (a mean of the finished alone is low early on,
    when only the short trials have finished); and from ``prior`` (seconds per trial from an
    earlier run, ``cost_prior``): the larger of the two. A defense with no estimate yet goes
    first, by share, so every defense's first trials start early.

    ``allocation: adaptive``: the sweep's total budget stays the sum of the defenses' trials,
    and every defense first gets its floor, half its own trials (rounded up), picked as
    above. The rest goes one trial at a time to the defense whose completed trials add the
    most hypervolume to the front of all completed trials (its exclusive contribution,
    ``orchestrator.aggregate.points_hypervolume``, one reference for all), ties (no results yet, or no contribution) to
    the smallest share of its own budget, as in ``fixed``. A defense on the front thus gets
    more trials, one that never reaches it keeps its floor.

    Tune saves the router (``save``) with its experiment state and a resumed sweep restores
    it: suggestion counts, owners, results and every study's searcher."""

    def __init__(self, searchers: dict[str, Searcher], budget: dict[str, int],
                 max_concurrent: dict[str, int | None] | None = None, adaptive: bool = False,
                 objectives: Sequence[str] = ("clean_acc", "robust_acc"),
                 longest_first: bool = False, prior: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__(metric=None, mode=None)
        self._searchers = dict(searchers)
        self._budget = dict(budget)
        self._cap = dict(max_concurrent or {})
        self._adaptive, self._objectives = adaptive, list(objectives)
        self._total = sum(budget.values())
        self._floor = {d: math.ceil(b / 2) if adaptive else b for d, b in budget.items()}
        self._suggested = {d: 0 for d in searchers}
        self._owner: dict[str, str] = {}
        self._running: set[str] = set()
        self._points: dict[str, list[tuple[float, ...]]] = {d: [] for d in searchers}
        self._longest_first, self._prior, self._clock = longest_first, dict(prior or {}), clock
        self._began: dict[str, float] = {}  # trial id -> when it was suggested (clock)
        self._seconds: dict[str, list[float]] = {d: [] for d in searchers}  # finished trials'

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return not config  # each defense's searcher holds its own space and objectives

    def open_defenses(self) -> list[str]:
        """The defenses that may still get a trial: those under their own budget (fixed), or
        every defense while the sweep's total is not used (adaptive)."""
        if self._adaptive:
            return list(self._searchers) if sum(self._suggested.values()) < self._total else []
        return [d for d in self._searchers if self._suggested[d] < self._budget[d]]

    def next_defense(self) -> str | None:
        """The defense of the next trial; None while every open defense is at its cap."""
        running = {d: sum(self._owner[t] == d for t in self._running) for d in self._searchers}
        free = [d for d in self.open_defenses() if self._cap.get(d) is None or running[d] < self._cap[d]]

        def share(d: str) -> float:
            return self._suggested[d] / self._budget[d]

        def first(d: str) -> tuple:  # the smallest goes first
            if not self._longest_first:
                return (share(d),)
            expected = self.expected_seconds(d)
            return (0, share(d)) if expected is None else (1, -expected, share(d))

        below = [d for d in free if self._suggested[d] < self._floor[d]]
        if below or not free:
            return min(below, key=first, default=None)
        gain = self.contributions()  # adaptive, every floor given
        return max(free, key=lambda d: (gain[d], -share(d)))

    def expected_seconds(self, defense: str) -> float | None:
        """How long ``defense``'s next trial is expected to hold its slot (``longest_first``),
        None before any of its trials finished and without a prior."""
        now = self._clock()
        done = self._seconds[defense]
        running = [now - self._began[t] for t in self._running
                   if self._owner[t] == defense and t in self._began]
        online = max([statistics.mean(done)] + running) if done else None
        known = [x for x in (online, self._prior.get(defense)) if x is not None]
        return max(known) if known else None

    def contributions(self) -> dict[str, float]:
        """Per defense, the hypervolume the front of all completed trials loses without its
        trials (0 for every defense before any result)."""
        from orchestrator.aggregate import points_hypervolume, reference_point

        every = [p for ps in self._points.values() for p in ps]
        ref = reference_point(np.array(every, float), self._objectives)  # one for all: cost's depends on the data

        def hv(points: list[tuple[float, ...]]) -> float:
            return points_hypervolume(np.array(points, float), self._objectives, ref)

        total = hv(every)
        return {d: total - hv([p for e, ps in self._points.items() if e != d for p in ps])
                for d in self._searchers}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.open_defenses():
            return Searcher.FINISHED
        defense = self.next_defense()
        if defense is None:
            return None
        config = self._searchers[defense].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return None
        self._owner[trial_id] = defense
        self._suggested[defense] += 1
        self._running.add(trial_id)
        self._began[trial_id] = self._clock()
        return {"defense": defense, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._searchers[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._running.discard(trial_id)
        if trial_id not in self._owner:
            return
        defense = self._owner[trial_id]
        began = self._began.pop(trial_id, None)
        if began is not None and not error and (result or {}).get("status") != RUNNING:
            # a trial that ended on a per-epoch result was stopped early: not a whole trial
            self._seconds[defense].append(self._clock() - began)
        values = [(result or {}).get(k) for k in self._objectives]
        if not error and (result or {}).get("status") != RUNNING and \
                all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            self._points[defense].append(tuple(float(v) for v in values))
        self._searchers[defense].on_trial_complete(trial_id, result, error)

    def owner(self, trial_id: str) -> str | None:
        return self._owner.get(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a sweep begun before start_order existed pickled a router without its fields
        self.__dict__.update({"_longest_first": False, "_prior": {}, "_clock": time.time, "_began": {},
                              "_seconds": {d: [] for d in state["_searchers"]}, **state})

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        # the trials that were running start again now: the driver's downtime is no trial's
        self._began.update({t: self._clock() for t in self._running if t in self._began})


class TrialResources:
    """What a trial holds, from the defense its configuration names (``SweepSpec.resources_for``:
    the spec's resources, a defense's GPU share or its own override). A data-parallel trial's
    function only waits on its Ray Train workers, which reserve their own placement group: it
    holds no CPU (with N workers on N CPUs it would keep one of them from starting); Tune
    cannot place a trial that asks for nothing at all, so it asks for one byte of memory."""

    def __init__(self, spec: SweepSpec):
        from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

        self._by_defense = {}
        for d in spec.defenses:
            r = spec.resources_for(d)
            self._by_defense[d] = resource_dict_to_pg_factory(
                {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial} if r.workers_per_trial == 1
                else {"cpu": 0, "memory": 1})

    def __call__(self, config: dict[str, Any]):
        return self._by_defense[config["defense"]]


import optuna.samplers  # noqa: E402  (OptunaSearch has imported optuna already)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II with its thread lock left out of its pickle and made anew on load. Tune pickles
    the searcher, sampler included (tuner.pkl, the searcher's checkpoints); Optuna 5.1's
    genetic samplers hold a ``threading.Lock``, which no pickle takes (Optuna's journal storage
    drops its own lock the same way). Without a lock (Optuna < 5.1) nothing changes."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if state.pop("_thread_lock", None) is not None:
            state["_had_thread_lock"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.pop("_had_thread_lock", False):
            state["_thread_lock"] = threading.Lock()
        self.__dict__.update(state)


class RecordedSearch(OptunaSearch):
    """OptunaSearch whose Optuna trials carry, as user attributes, the sweep's trial id (a row
    of trials.csv), its record file and its checkpoint, so that a study opened with Optuna's
    API or optuna-dashboard leads back to the model. Optuna takes user attributes only while
    a trial runs, so they are set just before Tune's searcher tells the result; the record
    (written by ``RecordWriter`` on the final result) holds the checkpoint by then. Reads
    ``OptunaSearch._ot_trials`` (checked on Ray ``sweep.TUNE_PRIVATE_API_CHECKED``, like
    ``use_live_callbacks``). A module-level class: Tune pickles the searcher with the run."""

    def __init__(self, *args, run_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self._run_dir = str(run_dir)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if not error and result and result.get("status") == RUNNING:
            result = None  # stopped early (after an epoch, not its evaluation): Optuna's PRUNED
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            for key, value in _user_attrs(Path(self._run_dir), trial_id).items():
                ot_trial.set_user_attr(key, value)
        super().on_trial_complete(trial_id, result, error)


def _user_attrs(run_dir: Path, trial_id: str) -> dict[str, str]:
    path = record_path(run_dir, trial_id)
    attrs = {"trial_id": trial_id, "record": str(path.resolve())}
    if path.is_file():
        attrs["checkpoint"] = load_record(path).checkpoint
    return attrs


def name_objectives(spec: SweepSpec, defense: str, run_dir: Path) -> bool:
    """Give ``defense``'s study the names of its objectives (``clean_acc``, ``robust_acc``,
    ...), so optuna-dashboard labels its axes; the values stay the search-time numbers the
    sampler learnt from (the final ones are in trials.csv). Returns whether it was named now."""
    import optuna

    study = _study(spec, defense, run_dir)
    if study is None or study.metric_names == list(spec.objectives):
        return False
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2, unchanged through 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    return True
