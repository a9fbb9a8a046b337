"""Data-parallel training of one trial over several processes (torch.distributed: gloo on CPU,
NCCL on GPU). Pure PyTorch: Ray Train only launches the processes and sets up the process
group (orchestrator/tune_adapter.py); the training loop is ``orchestrator.training.train``, the same
one a single process runs, handed a ``TorchDistributed`` instead of ``SingleProcess``.

Why not ``torch.nn.parallel.DistributedDataParallel`` (``ray.train.torch.prepare_model``)?
DDP's reducer assumes that every forward in train mode with gradients enabled is followed by
exactly one backward that reaches the parameters. Adversarial training breaks that assumption
in several ways: FGSM-RS differentiates a train-mode forward with respect to the *input* only
(``autograd.grad(loss, delta)``: the reducer waits for parameter gradients that never come and
the next forward fails with "Expected to have finished reduction in the prior iteration");
TRADES makes two train-mode forwards (clean and adversarial) before one backward; PGD and the
KL maximization run K forwards with frozen parameters; SAD re-estimates BatchNorm with forwards
under ``no_grad``. Working around each pattern (``find_unused_parameters``, ``no_sync``,
wrappers that bypass DDP for some forwards) would tie the loop to the internals of every defense.

Instead, the model stays a plain module and the optimizer is wrapped: after ``backward`` and
before ``step``, the gradients of every parameter the optimizer updates are all-reduced in one
flat collective. This is indifferent to how many forwards a defense makes and in which mode,
so it is correct for every registered defense whose training goes through the optimizer it
is given (all ``LossDefense`` subclasses). Defenses that train something else with an optimizer
of their own (a detector network) or nothing at all (calibration, BatchNorm re-estimation)
run the same computation redundantly on every rank; rank 0's result is the one checkpointed
and evaluated.

Batches: every rank walks the same seeded sequence of *global* batches (the ones one process
would see) and takes its contiguous shard of each. Each rank crafts the adversarial examples
of its own shard. Gradients are combined as Σ_r (n_r / n) · g_r, which for a per-batch mean
loss is exactly the gradient of the global batch, so N workers with global batch B take the
same steps as one worker with batch B (up to float summation order; see
tests/test_distributed.py for the measured difference). A ``DistributedSampler`` would give
each rank a different permutation and per-rank batches whose union is not the single-process
batch; the equivalence would be lost for no gain (the data sets here fit in every worker).

BatchNorm: without synchronization each rank normalizes with its shard's statistics (what DDP
does by default) and rank 0's running statistics are broadcast after every step so the
replicas stay identical. With ``sync_batchnorm`` every BatchNorm layer becomes a
``SyncBatchNorm*`` that computes the batch statistics over the global batch with a
differentiable all-reduce: the result then equals single-process BatchNorm on the global
batch. ``torch.nn.SyncBatchNorm`` is not used because it refuses CPU tensors (gloo)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from defenses.core import cache
from defenses.core.data import shard_bounds
from defenses.evaluation.benchmark import Shard

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ BatchNorm
# This rank's share n_r / n of the current global batch (set by TorchDistributed.shard).
_shard_weight = 1.0


class _AllReduceStats(torch.autograd.Function):
    """Sum over ranks, differentiable. Each rank back-propagates its own unweighted loss and
    the optimizer later weighs its gradients by n_r / n; so that the weighted sum over ranks is
    the global batch's gradient, the gradient reaching the statistics is Σ_r w_r g_r / w_self
    (with equal shards this is the plain sum torch.distributed.nn would give). The backward is
    itself a differentiable function (``_WeightedAllReduce``): a ``create_graph`` pass (ATAT's
    attention loss, an input-gradient penalty) differentiates it again, and an in-place
    all_reduce has no autograd kernel, so its second-order terms would be wrong."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.weight = _shard_weight
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _WeightedAllReduce.apply(grad, ctx.weight)


class _WeightedAllReduce(torch.autograd.Function):
    """g -> Σ_r w_r g_r / w_self (the backward of ``_AllReduceStats``). Its own backward is the
    adjoint h -> w_self · Σ_r h_r / w_r: the derivative of Σ_s <h_s, Σ_r w_r g_r / w_s> in g."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        out = grad * weight
        dist.all_reduce(out)
        return out / weight

    @staticmethod
    def backward(ctx, h: torch.Tensor):
        out = h / ctx.weight
        dist.all_reduce(out)
        return out * ctx.weight, None


class _SyncBatchNormMixin:
    """Train-mode batch statistics over all ranks; eval mode and ``sync=False`` behave as
    plain BatchNorm. Two all-reduces (sum → mean, then squared deviations → variance) give the
    same numbers as BatchNorm on the global batch, not the E[x²] − E[x]² shortcut."""

    sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        summed = _AllReduceStats.apply(torch.cat([x.sum(dims), count]))
        n = summed[-1]
        mean = summed[:-1] / n
        var = _AllReduceStats.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _update_running_stats(self, mean, var, n) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            unbiased = var * n / torch.clamp(n - 1, min=1)
            self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


_SYNC_CLASSES: dict[type, type] = {}


def _sync_class(cls: type) -> type:
    # A subclass of the layer's own class, so isinstance(m, nn.BatchNorm2d) still holds for
    # code that looks for BatchNorm layers (e.g. BN re-estimation, has_batchnorm).
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (_SyncBatchNormMixin, cls), {})
    return _SYNC_CLASSES[cls]


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every BatchNorm layer of ``model`` into its synchronized subclass, in place (the
    same parameter and buffer tensors: optimizers and state_dict keys are unchanged)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _SyncBatchNormMixin) \
                and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = _sync_class(type(m))
    return model


def set_batchnorm_sync(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, _SyncBatchNormMixin):
            m.sync = on


# ------------------------------------------------------------------------------ gradients
class GradientAllReduce:
    """Wraps an optimizer: ``step()`` first replaces each rank's gradients by their
    shard-weighted sum over all ranks (one flat all-reduce), then steps, then broadcasts
    rank 0's BatchNorm buffers. Everything else is the wrapped optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer, parallel: "TorchDistributed"):
        self.optimizer = optimizer
        self.parallel = parallel

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def step(self, closure=None):
        self.parallel.all_reduce_gradients(self.optimizer)
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.parallel.sync_buffers()
        return out


# ------------------------------------------------------------------------------ the context
class TorchDistributed:
    """What ``orchestrator.training.train`` needs to run as one rank of a data-parallel trial.
    The process group must already be initialized (Ray Train does it)."""

    def __init__(self, device: torch.device, sync_batchnorm: bool = False):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributed needs an initialized torch.distributed process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._device = torch.device(device)
        self.sync_batchnorm = sync_batchnorm
        self.model: nn.Module | None = None
        self.weight = 1.0       # this rank's share of the current global batch
        self.examples = 0       # examples this rank trained on in the current epoch
        self.dropped = 0        # global batches too small to give every rank an example

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def device(self, gpus: float) -> torch.device:
        return self._device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """SyncBatchNorm if asked; rank 0's initial weights everywhere (as DDP does)."""
        if self.sync_batchnorm:
            convert_sync_batchnorm(model)
        self.model = model
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        return model

    def shared_base(self, make, local: Path) -> Path:
        """Rank 0's base checkpoint on every rank. Rank 0 trains or reads it (``make``); a
        rank whose own copy (``local``: its node's run folder, unless all nodes share one) is
        missing or has other bytes gets rank 0's written there. So every rank's ``setup``
        loads the same teacher or classifier, and what it derives from it (SAT's maps, a
        detector's classifier fingerprint and caches) is the same; no rank trains a base."""
        path = make() if self.rank == 0 else local
        info = [cache.file_digest(path)] if self.rank == 0 else [None]
        dist.broadcast_object_list(info, src=0)
        need = self.rank != 0 and not (local.is_file() and cache.file_digest(local) == info[0])
        flags = torch.tensor([1.0 if need else 0.0], device=self._collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.item() > 0:
            payload = [path.read_bytes()] if self.rank == 0 else [None]
            dist.broadcast_object_list(payload, src=0)
            if need:
                cache.atomic_write(local, lambda tmp: tmp.write_bytes(payload[0]))
        return path

    def _collective_device(self) -> torch.device:
        return self._device if self._device.type == "cuda" else torch.device("cpu")

    def synchronize_setup(self, defense: Any) -> None:
        """Rank 0's weights in every module the defense holds once ``setup`` ran (the model,
        a teacher, Φ⁰, a detector network). Every rank loaded the same base checkpoint
        (``shared_base``), but what setup trains from it (a masking model) runs on each rank's
        GPU, which is not bitwise deterministic; the ranks would start apart and never meet
        again. The attributes are walked in the same order on every rank."""
        modules = [defense.model] + [m for m in vars(defense).values()
                                     if isinstance(m, nn.Module) and m is not defense.model]
        with torch.no_grad():
            for m in modules:
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> GradientAllReduce:
        return GradientAllReduce(optimizer, self)

    def shard(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator:
        global _shard_weight
        self.examples = 0
        for x, y in batches:
            n = len(y)
            if n < self.world_size:
                # Every rank must take part in every step's collectives: a batch that cannot
                # give each rank an example (only ever the last, smaller one) is skipped by all.
                self.dropped += 1
                log.warning("skipping a final batch of %d examples: fewer than the %d workers", n,
                            self.world_size)
                continue
            lo, hi = shard_bounds(n, self.rank, self.world_size)
            self.weight = _shard_weight = (hi - lo) / n
            self.examples += hi - lo
            yield x[lo:hi], y[lo:hi]

    def all_reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return
        ref = params[0]
        # A flag per parameter says whether any rank has a gradient for it: a parameter that
        # got none anywhere keeps grad=None, so the optimizer skips it as one process would.
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=ref.device,
                             dtype=ref.dtype)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * self.weight
                 for p in params]
        flat = torch.cat([flags] + grads)
        dist.all_reduce(flat)
        present = flat[:len(params)].gt(0).tolist()  # one device-to-host copy, not one per parameter
        offset = len(params)
        for p, has in zip(params, present):
            size = p.numel()
            if has:  # in the parameter's own memory format (channels-last weights stay fast)
                p.grad = torch.empty_like(p).copy_(flat[offset:offset + size].view_as(p))
            offset += size

    def sync_buffers(self) -> None:
        if self.model is None:
            return
        buffers = [b for b in self.model.buffers() if b.numel()]
        if not buffers:
            return
        with torch.no_grad():
            # one collective per dtype, not one per buffer per step (BN: 3 buffers per layer)
            for dtype in sorted({b.dtype for b in buffers}, key=str):
                group = [b for b in buffers if b.dtype == dtype]
                flat = torch.cat([b.reshape(-1) for b in group])
                dist.broadcast(flat, src=0)
                offset = 0
                for b in group:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def end_epoch(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """Metrics averaged over ranks (weighted by the examples each trained on), rank 0's
        buffers everywhere, and one decision about stopping: any rank asking stops them all."""
        self.sync_buffers()
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        w = float(max(self.examples, 1))
        device = self._collective_device()
        packed = torch.tensor([w, 1.0 if stop else 0.0] + [float(metrics[k]) * w for k in keys],
                              dtype=torch.float64, device=device)
        stop_t = packed[1:2].clone()
        dist.all_reduce(packed)
        dist.all_reduce(stop_t, op=dist.ReduceOp.MAX)
        reduced = dict(metrics)
        reduced.update({k: (packed[2 + i] / packed[0]).item() for i, k in enumerate(keys)})
        return reduced, bool(stop_t.item() > 0)

    def eval_shard(self) -> Shard:
        """This rank's share of the trial's evaluation: each rank attacks its share of the test
        points at every ε, rank 0 gathers the outcomes (one ``all_gather_object`` per ε) and
        runs the gradient-masking checks alone. Used inside ``local_only``: the gathers are the
        only collectives."""
        return Shard(self.rank, self.world_size, self.gather)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def local_only(self):
        """Inside, this rank's forwards run alone (BatchNorm statistics are not synchronized):
        an evaluation or validation pass whose shares differ in size between ranks."""
        if self.model is not None:
            set_batchnorm_sync(self.model, False)
        try:
            yield
        finally:
            if self.model is not None:
                set_batchnorm_sync(self.model, True)


__all__ = ["TorchDistributed", "GradientAllReduce", "convert_sync_batchnorm", "shard_bounds"]
