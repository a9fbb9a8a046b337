"""``run_trial(config)``: one trial, with or without Ray.

Build data, model and defense (``orchestrator.training``); train epoch by epoch, checkpointing
and reporting after each (so Tune can resume a trial); evaluate with
``defenses.evaluation.benchmark.evaluate``; report the final ``TrialRecord``. A reporter decides where reports and checkpoints go: Tune's
session in a sweep, Ray Train's in a data-parallel trial, a local folder from plain Python
(tests, notebooks). A ``Parallel`` decides how the loop is spread over processes: one process
(``SingleProcess``) or one rank of a data-parallel group (``orchestrator.distributed``); the
loop itself is the same."""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Protocol

import torch

from defenses.core import data as data_lib
from defenses.core.base import TrainingDiverged
from defenses.evaluation.benchmark import Shard
from orchestrator.records import COMPLETED, FAILED, TrialRecord, iso_utc
from orchestrator.spec import SweepSpec
from orchestrator.training import (CHECKPOINT_FILE, DeviceClock, Parallel, SingleProcess, TrialSetup,
                                   hold_gpu_share, release_gpu_memory,
                                   all_test_images, build_setup, load_checkpoint, save_checkpoint,
                                   spec_digest, train)

log = logging.getLogger(__name__)


class Reporter(Protocol):
    trial_id: str

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def restore(self) -> Path | None: ...


class LocalReporter:
    """Reports without Ray: keeps every result and the latest checkpoint under ``folder``."""

    def __init__(self, folder: Path, trial_id: str | None = None):
        self.trial_id = trial_id or uuid.uuid4().hex[:8]
        self.folder = Path(folder)
        self.results: list[dict[str, Any]] = []

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoint"

    def report(self, metrics, checkpoint_dir):
        self.results.append(metrics)
        if checkpoint_dir is not None:
            tmp = self.folder / ".checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            tmp.rename(self.checkpoint_dir)

    def restore(self):
        return self.checkpoint_dir if (self.checkpoint_dir / CHECKPOINT_FILE).is_file() else None


def saved_record(folder: Path, spec: SweepSpec) -> TrialRecord | None:
    """The final record stored in a checkpoint, if the trial had finished under this very spec
    when it was saved (a checkpoint reused with more epochs or other attacks goes on instead)."""
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    saved = state.get("record")
    if not saved or state.get("spec_digest") != spec_digest(spec):
        return None
    return TrialRecord.from_dict(saved)


def run_trial(config: dict[str, Any], reporter: Reporter | None = None,
              parallel: Parallel | None = None) -> TrialRecord:
    """Train and evaluate one configuration.

    ``config``: ``defense`` (registered name), ``hp`` (hyperparameters), ``spec`` (a SweepSpec or
    its dict), optional ``run_dir`` (where base models are cached) and ``trial_id``.
    ``parallel``: one rank of a data-parallel group (every rank calls ``run_trial``; rank 0
    checkpoints; every rank attacks its share of the test points, and the record other
    ranks return holds training fields only)."""
    spec = config["spec"] if isinstance(config["spec"], SweepSpec) else SweepSpec.model_validate(config["spec"])
    parallel = parallel or SingleProcess()
    defense_name, hp = config["defense"], dict(config.get("hp", {}))
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    if reporter is None:
        folder = Path(run_dir or tempfile.mkdtemp(prefix="trial-")) / "trials"
        reporter = LocalReporter(folder / (config.get("trial_id") or uuid.uuid4().hex[:8]),
                                 config.get("trial_id"))
    record = new_record(config, spec, reporter.trial_id)
    record.started_at = iso_utc()
    base = {"defense": defense_name, "epochs": spec.epochs}
    chief = parallel.rank == 0
    try:
        r = spec.resources_for(defense_name)  # this defense's share (resources.gpu_shares)
        torch.set_num_threads(max(1, int(r.cpus_per_trial)))
        device = parallel.device(r.gpus_per_trial)
        hold_gpu_share(device, r.gpus_per_trial)
        s = build_setup(spec, defense_name, hp, device, run_dir, parallel=parallel)
        s.optimizer = parallel.wrap_optimizer(s.optimizer)
        start_epoch, seconds_before, cost_before = 0, 0.0, 0.0
        restored = reporter.restore()
        record.warning = getattr(reporter, "warning", "")
        if restored is not None:
            start_epoch, seconds_before, started, cost_before = load_checkpoint(restored, s)
            record.started_at = started or record.started_at
            log.info("trial %s resumed after epoch %d", reporter.trial_id, start_epoch)
            done = saved_record(restored, spec)
            if done is not None:  # it had finished: report it again, do not redo it
                done.trial_id = reporter.trial_id
                reporter.report(final_metrics(done, spec.epochs, start_epoch), restored if chief else None)
                return done

        validation: dict[str, float] = {}  # the last epoch's validation objectives
        validation_seconds = 0.0           # their time, counted in eval_seconds
        # the trial's own work from here on (setup and shared base models are not its cost)
        clock = DeviceClock(device, r.gpus_per_trial, parallel.world_size)
        record.cost_unit = clock.unit

        def on_epoch(epoch: int, metrics: dict[str, float], seconds: float) -> None:
            nonlocal validation_seconds
            record.epochs = epoch
            ranked = chief and spec.scheduler.name != "none"  # what the early-stopping rungs rank
            if ranked:
                t0 = time.perf_counter()
                with parallel.local_only():
                    validation.update(validation_objectives(s))
                validation_seconds += time.perf_counter() - t0
            cost = cost_before + clock()  # so far, the validation included
            if ranked:
                metrics = {**metrics, **validation, "val_seconds": validation_seconds, "val.cost": cost}
            with tempfile.TemporaryDirectory() as tmp:
                if chief:
                    save_checkpoint(Path(tmp), s, epoch, seconds_before + seconds,
                                    started_at=record.started_at, cost=cost)
                reporter.report({**base, "epoch": epoch, "status": "running", "start_epoch": start_epoch,
                                 "train_seconds": seconds_before + seconds, "started_at": record.started_at,
                                 "cost": cost, "cost_unit": clock.unit,
                                 "clean_acc": math.nan, "robust_acc": math.nan, **metrics,
                                 **{f"flag.{k}": v for k, v in s.defense.flags().items()}},
                                Path(tmp) if chief else None)

        record.epochs = start_epoch
        record.train_seconds = seconds_before + train(s, spec.epochs, start_epoch, on_epoch, parallel)
        record.flags = s.defense.flags()
        record.status = COMPLETED
        broken = None
        with parallel.local_only():  # every rank attacks its share of the test points
            report = _evaluate(s, parallel.eval_shard())
        if chief:
            record.set_evaluation(report, validation)
            record.eval_seconds += validation_seconds
            broken = report.broken()
        record.cost = cost_before + clock()
        record.finished_at = iso_utc()
        with tempfile.TemporaryDirectory() as tmp:
            if chief:
                save_checkpoint(Path(tmp), s, record.epochs, record.train_seconds, record, broken,
                                started_at=record.started_at, cost=record.cost)
            reporter.report(final_metrics(record, spec.epochs, start_epoch), Path(tmp) if chief else None)
        return record
    except TrainingDiverged as e:
        # deterministic: a retry would diverge again, so the trial ends failed, the sweep goes on
        record.status, record.error, record.finished_at = FAILED, str(e), iso_utc()
        if parallel.world_size > 1:
            raise  # the other ranks wait in a collective: the launcher ends them and reports it
        reporter.report(final_metrics(record, spec.epochs), None)
        return record
    except Exception as e:
        record.status, record.error = FAILED, f"{type(e).__name__}: {e}"
        record.finished_at = iso_utc()
        log.error("trial %s failed:\n%s", reporter.trial_id, traceback.format_exc())
        if parallel.world_size == 1:
            reporter.report(final_metrics(record, spec.epochs), None)
        raise
    finally:
        release_gpu_memory()


def new_record(config: dict[str, Any], spec: SweepSpec, trial_id: str) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, defense=config["defense"], dataset=spec.dataset,
                       model=spec.model, seed=spec.seed, hp=dict(config.get("hp", {})),
                       run_id=config.get("run_id", ""))


def _evaluate(s: TrialSetup, shard: Shard = Shard()):
    """``defenses.evaluation.benchmark.evaluate``: every ε of the curve, then the
    gradient-masking checks; ``shard``: this rank's part (the report is rank 0's)."""
    from defenses.evaluation.benchmark import EvalSpec, evaluate

    n = s.spec.eval_samples or len(s.data.test_y)
    x = data_lib.as_float(s.data.test_x[:n], s.device)
    y = s.data.test_y[:n].to(s.device)
    t = s.spec.threat_model
    spec = EvalSpec.for_dataset(s.spec.dataset, t.eps, t.eval_eps, t.masking_samples,
                                attacks=tuple(t.attacks), curve_samples=t.curve_samples,
                                batch_size=max(s.spec.batch_size, 256), seed=s.spec.seed)
    return evaluate(s.defense, (x, y), spec, fpr_images=all_test_images(s), shard=shard)


VALIDATION_ATTACK = "apgd_ce-10"  # cheap and step-size free, as the search cascade's APGD
VALIDATION_IMAGES = 256          # at most this many of the validation split, every epoch


def validation_objectives(s: TrialSetup) -> dict[str, float]:
    """``val.clean_acc`` and ``val.robust_acc`` (APGD-CE-10 at the spec's ε) of the defense as
    it is after an epoch, on the first ≤ 256 images of the validation split (held out of all
    training): what ``orchestrator.mo_asha`` ranks trials on. The attack's random start draws
    from a forked RNG, so training goes on as it would without it. A defense that cannot
    predict mid-training (a detector before its threshold exists) reports nothing; its trials
    then run to the end."""
    from defenses.evaluation.benchmark import benchmark

    n = min(VALIDATION_IMAGES, s.data.n_val)
    x, y = data_lib.as_float(s.data.val_x[:n], s.device), s.data.val_y[:n].to(s.device)
    try:
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            r = benchmark(s.defense, x, y, s.spec.threat_model.eps, [VALIDATION_ATTACK],
                          max(s.spec.batch_size, 256), adaptive=False)
    except Exception as e:
        log.warning("no validation objectives this epoch (%s: %s): early stopping cannot judge "
                    "this trial", type(e).__name__, e)
        return {}
    return {"val.clean_acc": r.clean_acc, "val.robust_acc": r.robust_acc}


def final_metrics(record: TrialRecord, planned_epochs: int, start_epoch: int = 0) -> dict[str, Any]:
    """The last result a trial reports: its record, plus the columns Tune and the dashboard read."""
    return {"defense": record.defense, "epochs": planned_epochs, "epoch": record.epochs,
            "start_epoch": start_epoch, "status": record.status, "clean_acc": record.clean_acc,
            "robust_acc": record.robust_acc, "cost": record.cost, "error": record.error,
            "record": record.to_dict(),
            **{f"flag.{k}": v for k, v in record.flags.items()}}
