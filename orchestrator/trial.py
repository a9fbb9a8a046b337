"""``run_trial(config)``: the one training loop of a trial, with or without Ray.

Build data, model and defense from the registry; train epoch by epoch, checkpointing and
reporting after each (so Tune can resume a trial); evaluate with ``defenses.evaluate.benchmark``;
report the final ``TrialRecord``. A reporter decides where reports and checkpoints go: Tune's
session in a sweep, a local folder from plain Python (tests, notebooks)."""
from __future__ import annotations

import dataclasses
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

from defenses import data as data_lib
from defenses import models as model_lib
from defenses import registry
from defenses.base import Defense, TrainingDiverged
from defenses.evaluate import benchmark
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
                run_dir: Path | None, epochs: int | None = None) -> TrialSetup:
    torch.manual_seed(spec.seed)
    cls = registry.get(defense_name)
    train_hp, defense_hp = split_hp(hp)
    params = cls.make_params(defense_hp)
    dataset = data_lib.load(spec.dataset, spec.data_root, seed=spec.seed)
    if spec.train_samples is not None:
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[:spec.train_samples],
                                      train_y=dataset.train_y[:spec.train_samples])
    holdout = None
    if cls.holdout_size:
        k = cls.holdout_size
        holdout = (data_lib.as_float(dataset.train_x[:k], device), dataset.train_y[:k].to(device))
        dataset = dataclasses.replace(dataset, train_x=dataset.train_x[k:], train_y=dataset.train_y[k:])
    dataset = dataset.to(device)
    model = model_lib.build(spec.model, dataset.num_classes, dataset.in_channels).to(device)
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


def save_checkpoint(folder: Path, s: TrialSetup, epoch: int, train_seconds: float) -> None:
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
    }, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path, s: TrialSetup) -> tuple[int, float]:
    state = torch.load(folder / CHECKPOINT_FILE, map_location=s.device, weights_only=True)
    s.defense.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state["scheduler"] is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    s.defense.load_state_dict(state["defense_state"])
    return int(state["epoch"]), float(state["train_seconds"])


def train(s: TrialSetup, epochs: int, start_epoch: int = 0, on_epoch=None) -> float:
    """The training loop shared by trials and base models; returns training seconds."""
    seconds = 0.0
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        # the batch order depends only on (seed, epoch): a resumed trial sees the same batches
        order = torch.Generator().manual_seed(s.spec.seed * 100_003 + epoch)
        batches = data_lib.batches(s.data.train_x, s.data.train_y, s.spec.batch_size,
                                   shuffle=True, generator=order, device=s.device)
        metrics = s.defense.train_epoch(batches, s.optimizer, epoch, s.scheduler)
        metrics.update(s.defense.end_epoch(epoch, s.holdout))
        seconds += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(epoch, metrics, seconds)
        if s.defense.stop_training:
            log.info("%s stopped early after epoch %d", s.defense_name, epoch)
            break
    s.defense.finalize()
    return seconds


def run_trial(config: dict[str, Any], reporter: Reporter | None = None) -> TrialRecord:
    """Train and evaluate one configuration.

    ``config``: ``defense`` (registered name), ``hp`` (hyperparameters), ``spec`` (a SweepSpec or
    its dict), optional ``run_dir`` (where base models are cached) and ``trial_id``."""
    spec = config["spec"] if isinstance(config["spec"], SweepSpec) else SweepSpec.model_validate(config["spec"])
    defense_name, hp = config["defense"], dict(config.get("hp", {}))
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    if reporter is None:
        folder = Path(run_dir or tempfile.mkdtemp(prefix="trial-")) / "trials"
        reporter = LocalReporter(folder / (config.get("trial_id") or uuid.uuid4().hex[:8]),
                                 config.get("trial_id"))
    record = TrialRecord(trial_id=reporter.trial_id, defense=defense_name, dataset=spec.dataset,
                         model=spec.model, seed=spec.seed, hp=hp, run_id=config.get("run_id", ""))
    base = {"defense": defense_name, "epochs": spec.epochs}
    try:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
        s = build_setup(spec, defense_name, hp, choose_device(spec.resources.gpus_per_trial), run_dir)
        start_epoch, seconds_before = 0, 0.0
        restored = reporter.restore()
        if restored is not None:
            start_epoch, seconds_before = load_checkpoint(restored, s)
            log.info("trial %s resumed after epoch %d", reporter.trial_id, start_epoch)

        def on_epoch(epoch: int, metrics: dict[str, float], seconds: float) -> None:
            record.epochs = epoch
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), s, epoch, seconds_before + seconds)
                reporter.report({**base, "epoch": epoch, "status": "running",
                                 "clean_acc": math.nan, "robust_acc": math.nan, **metrics,
                                 **{f"flag.{k}": v for k, v in s.defense.flags().items()}}, Path(tmp))

        record.epochs = start_epoch
        record.train_seconds = seconds_before + train(s, spec.epochs, start_epoch, on_epoch)
        result = _evaluate(s)
        record.clean_acc, record.robust_acc = result.clean_acc, result.robust_acc
        record.robust_attack, record.acc = result.robust_attack, result.acc
        record.eval_seconds = result.seconds
        record.metrics = {"clean_rejected": result.clean_rejected}
        record.flags = s.defense.flags()
        record.status = COMPLETED
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), s, record.epochs, record.train_seconds)
            reporter.report(_final(base, record), Path(tmp))
        return record
    except TrainingDiverged as e:
        # deterministic: a retry would diverge again, so the trial ends failed, the sweep goes on
        record.status, record.error = FAILED, str(e)
        reporter.report(_final(base, record), None)
        return record
    except Exception as e:
        record.status, record.error = FAILED, f"{type(e).__name__}: {e}"
        log.error("trial %s failed:\n%s", reporter.trial_id, traceback.format_exc())
        reporter.report(_final(base, record), None)
        raise


def _evaluate(s: TrialSetup):
    n = s.spec.eval_samples or len(s.data.test_y)
    x = data_lib.as_float(s.data.test_x[:n], s.device)
    y = s.data.test_y[:n].to(s.device)
    torch.manual_seed(s.spec.seed)  # random starts of the attacks
    return benchmark(s.defense, x, y, s.spec.threat_model.eps, s.spec.threat_model.attacks,
                     batch_size=max(s.spec.batch_size, 256))


def _final(base: dict[str, Any], record: TrialRecord) -> dict[str, Any]:
    return {**base, "epoch": record.epochs, "status": record.status, "clean_acc": record.clean_acc,
            "robust_acc": record.robust_acc, "error": record.error, "record": record.to_dict(),
            **{f"flag.{k}": v for k, v in record.flags.items()}}
