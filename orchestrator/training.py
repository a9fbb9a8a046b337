"""How one trial's model is built and trained, with or without Ray: ``build_setup`` resolves
(spec, defense name, hyperparameters) into data, model, defense and optimizer through the
registry; ``train`` is the one epoch loop of trials (one process or a data-parallel rank,
``Parallel``) and of the base models defenses start from (``ensure_base``); checkpoints are
written and read here. The trial around it (reporting, evaluation, the record) is
``orchestrator.trial``."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from defenses.core import cache
from defenses.core import data as data_lib
from defenses.core import models as model_lib
from defenses.core import registry
from defenses.core.base import BaseModelRequest, Defense, cudnn_mode
from defenses.evaluation.benchmark import Shard
from orchestrator.records import TrialRecord
from orchestrator.spec import SweepSpec, split_hp

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


class Parallel(Protocol):
    """How one process takes part in training a trial (see ``orchestrator.distributed``)."""
    rank: int
    world_size: int

    def device(self, gpus: float) -> torch.device: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def shared_base(self, make: Callable[[], Path], local: Path) -> Path: ...

    def synchronize_setup(self, defense: Defense) -> None: ...

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def shard(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator: ...

    def end_epoch(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]: ...

    def local_only(self) -> contextlib.AbstractContextManager: ...

    def eval_shard(self) -> Shard: ...


class SingleProcess:
    """The whole trial in this process: every hook is the identity."""
    rank, world_size = 0, 1

    def device(self, gpus: float) -> torch.device:
        return choose_device(gpus)

    def prepare_model(self, model):
        return model

    def shared_base(self, make, local):
        return make()

    def synchronize_setup(self, defense):
        pass

    def wrap_optimizer(self, optimizer):
        return optimizer

    def shard(self, batches):
        return batches

    def end_epoch(self, metrics, stop):
        return metrics, stop

    def local_only(self):
        return contextlib.nullcontext()

    def eval_shard(self):
        return Shard()


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


class NoGPU(RuntimeError):
    """A trial given GPUs in a process that cannot see one."""


def choose_device(gpus: float) -> torch.device:
    """CUDA when the trial holds GPUs, else the CPU. A trial granted GPUs whose process sees
    no CUDA device (a CPU-only torch, CUDA_VISIBLE_DEVICES emptied, a driver mismatch) is an
    error: training it on the CPU instead would be silent and many times slower."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise NoGPU(f"gpus_per_trial={gpus:g} but this process sees no CUDA device "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                    "install a CUDA build of torch on the GPU nodes, or set gpus_per_trial: 0")
    return torch.device("cuda")


def hold_gpu_share(device: torch.device, gpus: float) -> None:
    """A trial granted a fraction of a GPU (``gpus_per_trial: 0.25``) may allocate that
    fraction of its memory and no more: Ray's GPU fraction is only a scheduling label, and
    without a cap one trial's caching allocator grows into its neighbours' share until one
    of them runs out of memory. Over the cap, this trial gets the out-of-memory error."""
    if device.type == "cuda" and 0 < gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus, device)


class DeviceClock:
    """Device-seconds a trial has used since it was made, summed over its ``workers`` (DDP
    ranks step in lockstep, so each holds its device as long as this one): on the CPU, this
    process's CPU time (every thread; a trial slowed by a neighbour is not charged for the
    wait), on a GPU the wall time × the GPU share held (what a cluster bills: a GPU's busy
    time cannot be read without a profiler). ``unit``: "cpu_s" or "gpu_s"."""

    def __init__(self, device: torch.device, gpus: float, workers: int = 1):
        self.unit = "gpu_s" if device.type == "cuda" else "cpu_s"
        self._read = time.perf_counter if device.type == "cuda" else time.process_time
        self._scale = workers * (gpus if device.type == "cuda" else 1.0)
        self._start = self._read()

    def __call__(self) -> float:
        return (self._read() - self._start) * self._scale


def release_gpu_memory() -> None:
    """After a trial: give the cached blocks back to the GPU, so that the next trial Ray runs
    in this reused actor (``reuse_actors``), or a neighbour on the same GPU, can take them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def build_setup(spec: SweepSpec, defense_name: str, hp: dict[str, Any], device: torch.device,
                run_dir: Path | None, epochs: int | None = None,
                parallel: Parallel | None = None) -> TrialSetup:
    """``parallel``: this process's part of a data-parallel trial (default: the whole trial);
    it sees the model before the defense does and the defense once ``setup`` loaded its base
    models (so that every rank starts from rank 0's)."""
    parallel = parallel or SingleProcess()
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
    model = parallel.prepare_model(model)  # before the defense sees it (it may hook its layers)
    defense = cls(model, params, spec.threat_model.threat_model())
    request = cls.base_model(params)
    base_path = None
    if request is not None:
        # Training the base (first trial only) must not shift this trial's random stream:
        # otherwise the first trial of a sweep and its re-run from the cache would differ.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            base_path = parallel.shared_base(lambda: ensure_base(spec, request, run_dir, device),
                                             base_checkpoint(spec, request, run_dir))
    defense.setup(dataset, base_path)
    parallel.synchronize_setup(defense)

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
        # (at least 3 steps: OneCycleLR divides by zero when either half is empty, as in a
        # one-epoch trial of 2 batches; a schedule longer than the run is never finished)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(steps, 3), pct_start=0.5,
            anneal_strategy="linear", cycle_momentum=False)
    return TrialSetup(spec, defense_name, hp, device, dataset, holdout, defense, optimizer, scheduler)


# ---------------------------------------------------------------- base models

def base_key(spec: SweepSpec, request: BaseModelRequest) -> str:
    recipe = {"defense": request.defense, "params": dict(request.params),
              "epochs": request.epochs or spec.epochs, "dataset": spec.dataset, "model": spec.model,
              "seed": spec.seed, "train_samples": spec.train_samples,
              "validation_samples": spec.validation_samples,
              "optimizer": spec.optimizer.model_dump(), "batch_size": spec.batch_size,
              # a detector's FPR does not change the model it guards: one base for every fpr
              "threat": spec.threat_model.model_dump(exclude={"attacks", "fpr"})}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.dataset}-{spec.model}-{request.defense}-s{spec.seed}-{digest}"


def base_checkpoint(spec: SweepSpec, request: BaseModelRequest, run_dir: Path | None) -> Path:
    """Where ``ensure_base`` keeps the checkpoint of ``request`` under ``run_dir``."""
    return Path(run_dir or tempfile.gettempdir()) / "bases" / base_key(spec, request) / CHECKPOINT_FILE


def ensure_base(spec: SweepSpec, request: BaseModelRequest, run_dir: Path | None,
                device: torch.device) -> Path:
    """The checkpoint of the base model ``request`` names, trained with this module's loop
    the first time any trial of the run asks for it and read from ``RUN_DIR/bases`` after
    (``defenses.core.cache.build_once``: concurrent trials wait instead of training twice)."""
    folder = base_checkpoint(spec, request, run_dir).parent

    def build(tmp: Path) -> None:
        epochs = request.epochs or spec.epochs
        log.info("training base model %s (%d epochs)", folder.name, epochs)
        s = build_setup(spec, request.defense, dict(request.params), device, run_dir, epochs)
        save_checkpoint(tmp, s, epochs, train(s, epochs))

    cache.build_once(folder, build, ready=lambda f: (f / CHECKPOINT_FILE).is_file())
    return folder / CHECKPOINT_FILE


# ---------------------------------------------------------------- checkpoints and the loop

def save_checkpoint(folder: Path, s: TrialSetup, epoch: int, train_seconds: float,
                    record: TrialRecord | None = None,
                    broken: dict[float, torch.Tensor] | None = None, started_at: str = "",
                    cost: float = math.nan) -> None:
    """``record``: the evaluated trial, kept in its final checkpoint so that a trial restarted
    after it finished (a driver killed before it saw the end) reports it instead of redoing it.
    ``broken``: per ε, the test points its evaluation found not robust (``Report.broken()``),
    which the sweep's final evaluation of this checkpoint does not attack again.
    ``started_at``: when the trial first started, kept so that a resumed trial keeps it;
    ``cost``: its device-seconds so far (``DeviceClock``), which a resumed trial adds to."""
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
        "started_at": started_at,
        "cost": cost,
    }, folder / CHECKPOINT_FILE)


def saved_broken(file: Path) -> dict[float, torch.Tensor]:
    """What ``save_checkpoint(broken=...)`` stored (empty for a checkpoint without it)."""
    saved = torch.load(file, map_location="cpu", weights_only=True).get("broken")
    return dict(zip(saved["eps"], saved["masks"])) if saved else {}


def spec_digest(spec: SweepSpec) -> str:
    # tracking is where results are also sent, not what a trial computes
    return hashlib.sha256(json.dumps(spec.model_dump(exclude={"tracking"}), sort_keys=True)
                          .encode()).hexdigest()[:16]


def load_checkpoint(folder: Path, s: TrialSetup) -> tuple[int, float, str, float]:
    """Restore ``s`` from ``folder``; (epochs done, training seconds, ``started_at``, device-seconds
    so far: 0 for a checkpoint saved before they were counted)."""
    # loaded on the CPU: load_state_dict copies weights onto the model's device and the
    # optimizer's state onto its parameters', but keeps Adam's ``step`` counters on the CPU,
    # where the optimizer reads them without waiting for the GPU (map_location=cuda moved them)
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    s.defense.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state["scheduler"] is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    s.defense.load_state_dict(state["defense_state"])
    cost = float(state.get("cost", math.nan))
    return (int(state["epoch"]), float(state["train_seconds"]), str(state.get("started_at", "")),
            0.0 if math.isnan(cost) else cost)


def train(s: TrialSetup, epochs: int, start_epoch: int = 0, on_epoch=None,
          parallel: Parallel | None = None) -> float:
    """The training loop shared by trials (one process or data-parallel ranks) and base
    models; returns training seconds. cuDNN autotunes its kernels (fixed batch shapes)."""
    with cudnn_mode(benchmark=True, deterministic=False):
        return _train(s, epochs, start_epoch, on_epoch, parallel or SingleProcess())


def _train(s: TrialSetup, epochs: int, start_epoch: int, on_epoch, parallel: Parallel) -> float:
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


def all_test_images(s: TrialSetup) -> torch.Tensor:
    """The whole test split: a detector's realized FPR is measured on it (one clean pass)."""
    return data_lib.as_float(s.data.test_x, s.device)
