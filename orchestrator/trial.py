"""``run_trial(config)``: the one training loop of a trial, with or without Ray.

Build data, model and defense from the registry; train epoch by epoch, checkpointing and
reporting after each (so Tune can resume a trial); evaluate with ``defenses.evaluate.evaluate``;
report the final ``TrialRecord``. A reporter decides where reports and checkpoints go: Tune's
session in a sweep, Ray Train's in a data-parallel trial, a local folder from plain Python
(tests, notebooks). A ``Parallel`` decides how the loop is spread over processes: one process
(``SingleProcess``) or one rank of a data-parallel group (``orchestrator.distributed``); the
loop itself is the same."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from defenses import data as data_lib
from defenses import models as model_lib
from defenses import registry
from defenses.base import Defense, TrainingDiverged
from orchestrator.records import COMPLETED, FAILED, TrialRecord
from orchestrator.spec import SweepSpec, split_hp

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


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


class Parallel(Protocol):
    """How one process takes part in training a trial (see ``orchestrator.distributed``)."""
    rank: int
    world_size: int

    def device(self, gpus: float) -> torch.device: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def shard(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator: ...

    def end_epoch(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]: ...

    def local_only(self) -> contextlib.AbstractContextManager: ...


class SingleProcess:
    """The whole trial in this process: every hook is the identity."""
    rank, world_size = 0, 1

    def device(self, gpus: float) -> torch.device:
        return choose_device(gpus)

    def prepare_model(self, model):
        return model

    def wrap_optimizer(self, optimizer):
        return optimizer

    def shard(self, batches):
        return batches

    def end_epoch(self, metrics, stop):
        return metrics, stop

    def local_only(self):
        return contextlib.nullcontext()


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The RNG seed of one epoch's random draws (attack starts, noise): a function of
    (seed, epoch, stream) only, so a trial resumed from an epoch checkpoint draws what the
    uninterrupted trial drew. Stream 0 is the end-of-epoch checks (the same on every rank),
    stream 1 + rank the training of that rank (ranks draw independent noise)."""
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2 ** 63)


@dataclasses.dataclass
class TrialSetup:
    """Everything a trial trains: resolved once from (spec, defense name, hyperparameters)."""
    spec: SweepSpec
    defense_name: str
    hp: dict[str, Any]
    device: torch.device
    data: data_lib.Dataset
    holdout: tuple[torch.Tensor, torch.Tensor] | None
    defense: Defense
    optimizer: torch.optim.Optimizer
    scheduler: Any


def choose_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def build_setup(spec: SweepSpec, defense_name: str, hp: dict[str, Any], device: torch.device,
                run_dir: Path | None, epochs: int | None = None,
                prepare_model: Callable[[nn.Module], nn.Module] | None = None) -> TrialSetup:
    torch.manual_seed(spec.seed)
    cls = registry.get(defense_name)
    train_hp, defense_hp = split_hp(hp)
    params = cls.make_params(defense_hp)
    dataset = data_lib.load(spec.dataset, spec.data_root, seed=spec.seed)
    # before train_samples: the validation images are the last of the seeded order, so neither
    # this trial nor any base model (built here too) ever trains on them
    dataset = data_lib.hold_out_validation(dataset, spec.validation_samples)
    if spec.train_samples is not None:
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[:spec.train_samples],
                                      train_y=dataset.train_y[:spec.train_samples])
    holdout = None
    if cls.holdout_size:
        k = cls.holdout_size
        holdout = (data_lib.as_float(dataset.train_x[:k], device), dataset.train_y[:k].to(device))
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[k:], train_y=dataset.train_y[k:])
    dataset = dataset.to(device)
    # channels-last: oneDNN's / cuDNN's NHWC kernels make the convolutions and the pooling of a
    # PGD step 1.2x faster here (BENCHMARKS.md, B1); the numbers stay those of the same network
    model = model_lib.build(spec.model, dataset.num_classes, dataset.in_channels).to(
        device, memory_format=torch.channels_last)
    if prepare_model is not None:  # before the defense sees the model (it may hook its layers)
        model = prepare_model(model)
    defense = cls(model, params, spec.threat_model.threat_model())
    request = cls.base_model(params)
    base_path = None
    if request is not None:
        from orchestrator.bases import ensure_base

        # Training the base (first trial only) must not shift this trial's random stream:
        # otherwise the first trial of a sweep and its re-run from the cache would differ.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            base_path = ensure_base(spec, request, run_dir, device)
    defense.setup(dataset, base_path)

    opt = spec.optimizer
    lr = float(train_hp.get("lr", opt.lr))
    wd = float(train_hp.get("weight_decay", opt.weight_decay))
    if opt.name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=opt.momentum, weight_decay=wd)
    scheduler = None
    if opt.schedule == "cyclic":
        # fast_adversarial's triangle: 0 -> lr at mid-training -> 0, stepped per batch
        steps = (epochs or spec.epochs) * math.ceil(len(dataset.train_y) / spec.batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.5,
            anneal_strategy="linear", cycle_momentum=False)
    return TrialSetup(spec, defense_name, hp, device, dataset, holdout, defense, optimizer, scheduler)


def save_checkpoint(folder: Path, s: TrialSetup, epoch: int, train_seconds: float,
                    record: TrialRecord | None = None,
                    broken: dict[float, torch.Tensor] | None = None) -> None:
    """``record``: the evaluated trial, kept in its final checkpoint so that a trial restarted
    after it finished (a driver killed before it saw the end) reports it instead of redoing it.
    ``broken``: per ε, the test points its evaluation found not robust (``Report.broken()``),
    which the sweep's final evaluation of this checkpoint does not attack again."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": s.defense.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
        "defense_state": s.defense.state_dict(),
        "epoch": epoch, "train_seconds": train_seconds,
        "meta": {"dataset": s.spec.dataset, "model": s.spec.model, "defense": s.defense_name,
                 "num_classes": s.data.num_classes, "in_channels": s.data.in_channels,
                 "seed": s.spec.seed, "hp": s.hp},
        "record": record.to_dict() if record is not None else None,
        "broken": {"eps": list(broken), "masks": list(broken.values())} if broken else None,
        "spec_digest": spec_digest(s.spec),
    }, folder / CHECKPOINT_FILE)


def saved_broken(file: Path) -> dict[float, torch.Tensor]:
    """What ``save_checkpoint(broken=...)`` stored (empty for a checkpoint without it)."""
    saved = torch.load(file, map_location="cpu", weights_only=True).get("broken")
    return dict(zip(saved["eps"], saved["masks"])) if saved else {}


def spec_digest(spec: SweepSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(folder: Path, s: TrialSetup) -> tuple[int, float]:
    state = torch.load(folder / CHECKPOINT_FILE, map_location=s.device, weights_only=True)
    s.defense.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state["scheduler"] is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    s.defense.load_state_dict(state["defense_state"])
    return int(state["epoch"]), float(state["train_seconds"])


def saved_record(folder: Path, spec: SweepSpec) -> TrialRecord | None:
    """The final record stored in a checkpoint, if the trial had finished under this very spec
    when it was saved (a checkpoint reused with more epochs or other attacks goes on instead)."""
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    saved = state.get("record")
    if not saved or state.get("spec_digest") != spec_digest(spec):
        return None
    return TrialRecord.from_dict(saved)


def train(s: TrialSetup, epochs: int, start_epoch: int = 0, on_epoch=None,
          parallel: Parallel | None = None) -> float:
    """The training loop shared by trials (one process or data-parallel ranks) and base
    models; returns training seconds."""
    parallel = parallel or SingleProcess()
    seconds = 0.0
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        # the batch order depends only on (seed, epoch): a resumed trial sees the same batches
        order = torch.Generator().manual_seed(s.spec.seed * 100_003 + epoch)
        batches = data_lib.batches(s.data.train_x, s.data.train_y, s.spec.batch_size,
                                   shuffle=True, generator=order, device=s.device)
        torch.manual_seed(epoch_seed(s.spec.seed, epoch, 1 + parallel.rank))
        metrics = s.defense.train_epoch(parallel.shard(batches), s.optimizer, epoch, s.scheduler)
        torch.manual_seed(epoch_seed(s.spec.seed, epoch, 0))
        metrics.update(s.defense.end_epoch(epoch, s.holdout))
        metrics, s.defense.stop_training = parallel.end_epoch(metrics, s.defense.stop_training)
        seconds += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(epoch, metrics, seconds)
        if s.defense.stop_training:
            log.info("%s stopped early after epoch %d", s.defense_name, epoch)
            break
    s.defense.finalize()
    return seconds


def run_trial(config: dict[str, Any], reporter: Reporter | None = None,
              parallel: Parallel | None = None) -> TrialRecord:
    """Train and evaluate one configuration.

    ``config``: ``defense`` (registered name), ``hp`` (hyperparameters), ``spec`` (a SweepSpec or
    its dict), optional ``run_dir`` (where base models are cached) and ``trial_id``.
    ``parallel``: one rank of a data-parallel group (every rank calls ``run_trial``; rank 0
    checkpoints and evaluates, the record other ranks return holds training fields only)."""
    spec = config["spec"] if isinstance(config["spec"], SweepSpec) else SweepSpec.model_validate(config["spec"])
    parallel = parallel or SingleProcess()
    defense_name, hp = config["defense"], dict(config.get("hp", {}))
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    if reporter is None:
        folder = Path(run_dir or tempfile.mkdtemp(prefix="trial-")) / "trials"
        reporter = LocalReporter(folder / (config.get("trial_id") or uuid.uuid4().hex[:8]),
                                 config.get("trial_id"))
    record = new_record(config, spec, reporter.trial_id)
    base = {"defense": defense_name, "epochs": spec.epochs}
    chief = parallel.rank == 0
    try:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
        s = build_setup(spec, defense_name, hp, parallel.device(spec.resources.gpus_per_trial), run_dir,
                        prepare_model=parallel.prepare_model)
        s.optimizer = parallel.wrap_optimizer(s.optimizer)
        start_epoch, seconds_before = 0, 0.0
        restored = reporter.restore()
        record.warning = getattr(reporter, "warning", "")
        if restored is not None:
            start_epoch, seconds_before = load_checkpoint(restored, s)
            log.info("trial %s resumed after epoch %d", reporter.trial_id, start_epoch)
            done = saved_record(restored, spec)
            if done is not None:  # it had finished: report it again, do not redo it
                done.trial_id = reporter.trial_id
                reporter.report(final_metrics(done, spec.epochs, start_epoch), restored if chief else None)
                return done

        def on_epoch(epoch: int, metrics: dict[str, float], seconds: float) -> None:
            record.epochs = epoch
            with tempfile.TemporaryDirectory() as tmp:
                if chief:
                    save_checkpoint(Path(tmp), s, epoch, seconds_before + seconds)
                reporter.report({**base, "epoch": epoch, "status": "running", "start_epoch": start_epoch,
                                 "clean_acc": math.nan, "robust_acc": math.nan, **metrics,
                                 **{f"flag.{k}": v for k, v in s.defense.flags().items()}},
                                Path(tmp) if chief else None)

        record.epochs = start_epoch
        record.train_seconds = seconds_before + train(s, spec.epochs, start_epoch, on_epoch, parallel)
        record.flags = s.defense.flags()
        record.status = COMPLETED
        broken = None
        if chief:
            with parallel.local_only():
                report = _evaluate(s)
            record.set_evaluation(report)
            broken = report.broken()
        with tempfile.TemporaryDirectory() as tmp:
            if chief:
                save_checkpoint(Path(tmp), s, record.epochs, record.train_seconds, record, broken)
            reporter.report(final_metrics(record, spec.epochs, start_epoch), Path(tmp) if chief else None)
        return record
    except TrainingDiverged as e:
        # deterministic: a retry would diverge again, so the trial ends failed, the sweep goes on
        record.status, record.error = FAILED, str(e)
        if parallel.world_size > 1:
            raise  # the other ranks wait in a collective: the launcher ends them and reports it
        reporter.report(final_metrics(record, spec.epochs), None)
        return record
    except Exception as e:
        record.status, record.error = FAILED, f"{type(e).__name__}: {e}"
        log.error("trial %s failed:\n%s", reporter.trial_id, traceback.format_exc())
        if parallel.world_size == 1:
            reporter.report(final_metrics(record, spec.epochs), None)
        raise


def new_record(config: dict[str, Any], spec: SweepSpec, trial_id: str) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, defense=config["defense"], dataset=spec.dataset,
                       model=spec.model, seed=spec.seed, hp=dict(config.get("hp", {})),
                       run_id=config.get("run_id", ""))


def _evaluate(s: TrialSetup):
    """``defenses.evaluate.evaluate``: every ε of the curve, then the gradient-masking checks."""
    from defenses.evaluate import EvalSpec, evaluate

    n = s.spec.eval_samples or len(s.data.test_y)
    x = data_lib.as_float(s.data.test_x[:n], s.device)
    y = s.data.test_y[:n].to(s.device)
    t = s.spec.threat_model
    spec = EvalSpec.for_dataset(s.spec.dataset, t.eps, t.eval_eps, t.masking_samples,
                                attacks=tuple(t.attacks), curve_samples=t.curve_samples,
                                batch_size=max(s.spec.batch_size, 256), seed=s.spec.seed)
    return evaluate(s.defense, (x, y), spec, fpr_images=all_test_images(s))


def all_test_images(s: TrialSetup) -> torch.Tensor:
    """The whole test split: a detector's realized FPR is measured on it (one clean pass)."""
    return data_lib.as_float(s.data.test_x, s.device)


def final_metrics(record: TrialRecord, planned_epochs: int, start_epoch: int = 0) -> dict[str, Any]:
    """The last result a trial reports: its record, plus the columns Tune and the dashboard read."""
    return {"defense": record.defense, "epochs": planned_epochs, "epoch": record.epochs,
            "start_epoch": start_epoch, "status": record.status, "clean_acc": record.clean_acc,
            "robust_acc": record.robust_acc, "error": record.error, "record": record.to_dict(),
            **{f"flag.{k}": v for k, v in record.flags.items()}}
