"""Data-parallel trials: N ranks with global batch B take the steps one process takes with
batch B, for defenses that call the model in every way adversarial training does; the same
through a real Ray Train ``TorchTrainer`` inside a Tune sweep; resources checked up front.

Tolerance: 1e-5 absolute on every weight and buffer after one epoch of 3-4 SGD steps (the
ranks sum their gradients in another order than one process does; observed differences are
~1e-7). The mechanics test runs its models in float64: sign-gradient attacks (PGD, the TRADES
maximization) turn a last-bit difference of a near-zero input gradient - which float32 kernels
make when the batch size changes - into a flipped step, so in float32 adversarial training is
equivalent only up to such flips, whatever the parallelization."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import yaml

from defenses.core import data as data_lib
from defenses.core import models, registry
from defenses.core.base import ThreatModel
from orchestrator import sweep
from orchestrator.distributed import TorchDistributed, convert_sync_batchnorm, shard_bounds
from orchestrator.spec import SpecError, parse
from orchestrator.trial import LocalReporter, run_trial
from orchestrator.training import SingleProcess, TrialSetup, train

TOL = 1e-5
N_TRAIN, BATCH, HOLDOUT = 120, 41, 32  # batches of 41, 41, 38: shards of 21/20, 19/19
# (defense, model, SyncBatchNorm): the plain loss; PGD forwards with frozen parameters; two
# train-mode forwards before one backward (TRADES); an input gradient taken in train mode
# (FGSM-RS: collectives in a forward and in a backward that reaches no parameter). BatchNorm
# models synchronize their statistics over the global batch.
CASES = [("standard", "small_cnn", True), ("pgd_at", "tiny", False),
         ("trades", "small_cnn", True), ("fgsm_rs", "small_cnn", True)]


class Float64(nn.Module):
    """The images stay float32 (the data pipeline's); the model computes in float64."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.double()

    def forward(self, x):
        return self.model(x.double())


@functools.lru_cache(maxsize=1)
def mnist():
    return data_lib.load("mnist5k")


class TinyNoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 13 * 13, 10))

    def forward(self, x):
        return self.net(x)


# The defenses draw random starts per example; drawn from an RNG they depend on how a batch
# is split. For the comparison they are made a function of the example itself (of its pixel
# values and positions: the same value everywhere would make max-pooling ties, whose winner
# a last-bit difference picks).
def _pattern(x, scale: float, shift: float) -> torch.Tensor:
    position = torch.arange(x[0].numel(), dtype=x.dtype, device=x.device).view_as(x[0])
    return torch.sin(x * scale + position * 1.7 + shift)


def _start(x, eps, generator=None):
    return (x + eps * _pattern(x, 917.0, 3.0)).clamp(0.0, 1.0) - x


def _noise_like(x, **kwargs):
    return _pattern(x, 411.0, 1.0)


def patch_randomness(setattr_):
    import importlib

    import defenses.fgsm_rs
    import defenses.trades

    setattr_(importlib.import_module("defenses.attacks.pgd"), "random_start", _start)
    setattr_(defenses.fgsm_rs, "random_start", _start)
    setattr_(defenses.trades.torch, "randn_like", _noise_like)


def make_setup(defense: str, model_kind: str, sync: bool, parallel) -> TrialSetup:
    torch.manual_seed(0)
    ds = mnist()
    data = dataclasses.replace(ds, train_x=ds.train_x[:N_TRAIN], train_y=ds.train_y[:N_TRAIN])
    model = Float64(TinyNoBN() if model_kind == "tiny" else models.build("small_cnn", 10, 1))
    if sync and parallel.world_size == 1:
        convert_sync_batchnorm(model)  # a no-op alone: the reference is plain BatchNorm
    model = parallel.prepare_model(model)
    cls = registry.get(defense)
    d = cls(model, cls.make_params({}), ThreatModel(eps=0.3, train_steps=3))
    opt = parallel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    holdout = None
    if cls.holdout_size:
        holdout = (data_lib.as_float(ds.train_x[N_TRAIN:N_TRAIN + HOLDOUT]), ds.train_y[N_TRAIN:N_TRAIN + HOLDOUT])
    spec = parse({"defenses": [defense], "batch_size": BATCH, "seed": 0})
    return TrialSetup(spec, defense, {}, torch.device("cpu"), data, holdout, d, opt, None)


@contextlib.contextmanager
def gloo(rank: int, world: int, init_file: str, seconds: int = 120):
    """One rank of a gloo group on this machine (what Ray Train sets up on a cluster), one
    thread; a collective nobody joins ends in the timeout's error instead of a hang."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank of a gloo group on this machine (what Ray Train sets up on a cluster)."""
    patch_randomness(setattr)
    with gloo(rank, world, init_file):
        for defense, kind, sync in CASES:
            parallel = TorchDistributed(torch.device("cpu"), sync_batchnorm=sync)
            s = make_setup(defense, kind, sync, parallel)
            train(s, 1, parallel=parallel)
            torch.save(s.defense.model.state_dict(), Path(out) / f"{defense}-rank{rank}.pt")


def test_two_ranks_take_the_steps_of_one_process(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    patch_randomness(monkeypatch.setattr)
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for defense, kind, sync in CASES:
        s = make_setup(defense, kind, sync, SingleProcess())
        train(s, 1)
        ref = s.defense.model.state_dict()
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{defense}-rank{rank}.pt", weights_only=True)
            for k, v in ref.items():
                diff = (got[k].double() - v.double()).abs().max().item()
                assert diff <= TOL, (defense, rank, k, diff)
        # and the steps were real: the weights moved
        fresh = make_setup(defense, kind, sync, SingleProcess()).defense.model.state_dict()
        assert any((fresh[k] - ref[k]).abs().max() > 1e-3 for k in ref if ref[k].is_floating_point())


def test_shards_cover_each_batch_once():
    for n in (1, 7, 40, 41):
        for world in (1, 2, 3):
            if n < world:
                continue
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


# ------------------------------------------------------------------ through Ray Train
# float32 and BatchNorm: the gradients of a global batch and of its shards differ by up to
# ~1e-4 relative (BatchNorm's backward subtracts batch means, summed in another order), and a
# few SGD steps amplify that; the 4 steps below end ~1e-5 apart in the default memory format
# and up to ~2.5e-4 apart in channels-last (what trials use: its oneDNN kernels block a batch
# of 25 and one of 50 differently), while training each rank on its own shard without the
# all-reduce moves the weights apart by ~1e-2. Exact equality is checked in float64 above.
TOL_FLOAT32 = 1e-3
GOOD_LR = 0.01
TINY = {"name": "ddp", "epochs": 1, "train_samples": 200, "eval_samples": 40, "batch_size": 50,
        "optimizer": {"name": "sgd", "lr": GOOD_LR}, "search": "random",
        "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2, "final_eval": "none"}}


def write_spec(tmp_path, **over):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**TINY, **over}))
    return str(path)


@pytest.mark.slow  # ~50 s: Ray Train trials in a Tune sweep; the gloo checks below stay fast
def test_data_parallel_trials_in_a_sweep(ray_session, tmp_path):
    """Two trials of 2 gloo workers each inside Tune: one trains (its weights are those of one
    process with the same global batch), one diverges (failed with its reason, no retry,
    the sweep completes)."""
    resources = {"workers_per_trial": 2, "cpus_per_trial": 1, "sync_batchnorm": True}
    spec = write_spec(tmp_path, resources=resources, defenses={
        "standard": {"trials": 2, "space": {"lr": [GOOD_LR, 1e12]}}})
    out = tmp_path / "out"
    assert sweep.main(["--spec", spec, "--out", str(out), "--no-dashboard"]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    ok, bad = trials[trials["hp.lr"] == GOOD_LR], trials[trials["hp.lr"] == 1e12]
    assert len(ok) == len(bad) == 1  # the seeded random search draws each lr once
    assert (ok.status == "completed").all() and (bad.status == "failed").all()
    assert bad.error.str.contains("nan").all()
    got = torch.load(Path(ok.checkpoint.iloc[0]) / "checkpoint.pt", weights_only=True)["model"]

    one = parse({**TINY, "defenses": ["standard"]})
    rep = LocalReporter(tmp_path / "single", "single")
    rec = run_trial({"defense": "standard", "hp": {"lr": GOOD_LR}, "spec": one}, reporter=rep)
    ref = torch.load(rep.checkpoint_dir / "checkpoint.pt", weights_only=True)["model"]
    diffs = {k: (got[k].double() - v.double()).abs().max().item() for k, v in ref.items()}
    assert max(diffs.values()) <= TOL_FLOAT32, diffs
    assert ok.clean_acc.iloc[0] == pytest.approx(rec.clean_acc, abs=1 / 40)


@pytest.mark.parametrize("resources,needle", [
    ({"workers_per_trial": 3}, "workers_per_trial=3"),
    ({"workers_per_trial": 2, "cpus_per_trial": 2}, "workers_per_trial=2 needs 4 CPUs"),
])
def test_more_workers_than_cpus_exits_2_before_ray(tmp_path, capsys, monkeypatch, resources, needle):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ray.init")))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    spec = write_spec(tmp_path, resources=resources, defenses=["standard"])
    assert sweep.main(["--spec", spec, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_ranks_of_a_trial_cannot_share_a_gpu():
    with pytest.raises(SpecError, match="cannot share a GPU"):
        parse({"defenses": ["standard"], "resources": {"workers_per_trial": 2, "gpus_per_trial": 0.5}})
    with pytest.raises(SpecError, match="exceeds batch_size"):
        parse({"defenses": ["standard"], "batch_size": 2, "resources": {"workers_per_trial": 3}})


# --- a create_graph pass through synchronized BatchNorm ---------------------------------------
N_SECOND = 40  # two equal shards of 20


def _penalized_loss(model, x, y):
    """Cross-entropy plus an input-gradient penalty: the gradient is taken with create_graph
    (as ATAT's attention loss and Grad-CAM-style losses do), so the parameter gradient is
    second-order through BatchNorm's batch statistics."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    g, = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    return torch.nn.functional.cross_entropy(logits, y) + 10.0 * g.pow(2).sum() / len(y)


def _second_order_batch():
    """The first N_SECOND training images with a little fixed noise. On MNIST's blank regions
    every activation of a channel is the same number up to rounding, and which of them wins a
    max-pool window is then decided by the convolution's summation order, which follows the
    batch size (the ranks see 20 images, the reference 40) and the CPU's kernels: the input
    gradient that the penalty squares lands on other pixels, and the second-order parameter
    gradients differ by 0.3 % (seen on an AVX-512 machine). The noise makes each window's
    maximum a real one."""
    ds = mnist()
    x = data_lib.as_float(ds.train_x[:N_SECOND])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return (x + 0.01 * noise).clamp(0, 1), ds.train_y[:N_SECOND]


def _second_order_model():
    torch.manual_seed(0)
    return Float64(models.build("small_cnn", 10, 1)).train()


def _second_order_rank(rank: int, world: int, init_file: str, out: str) -> None:
    with gloo(rank, world, init_file):
        parallel = TorchDistributed(torch.device("cpu"), sync_batchnorm=True)
        model = parallel.prepare_model(_second_order_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        (xs, ys), = parallel.shard([_second_order_batch()])
        _penalized_loss(model, xs, ys).backward()
        parallel.all_reduce_gradients(opt)
        torch.save({n: p.grad for n, p in model.named_parameters()}, Path(out) / f"grad{rank}.pt")


def test_second_order_losses_through_synced_batchnorm_match_one_process(tmp_path):
    mp.start_processes(_second_order_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    model = _second_order_model()
    _penalized_loss(model, *_second_order_batch()).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            scale = p.grad.abs().max().item()
            diff = (got[name] - p.grad).abs().max().item()
            assert diff <= 1e-6 * max(scale, 1.0), (rank, name, diff, scale)


# --- every rank starts from rank 0's base model, whatever its node had ----------------------

def _place_base(node: Path, spec, defense: str, seed: int) -> bytes:
    """A standard classifier as ``defense``'s base model in ``node``'s run folder, where
    ``ensure_base`` finds it; different seeds stand for two nodes that each trained their own
    (GPU kernels are not bitwise deterministic). Returns its bytes."""
    from orchestrator.training import base_checkpoint

    cls = registry.get(defense)
    path = base_checkpoint(spec, cls.base_model(cls.make_params({})), node)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    meta = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
            "in_channels": 1, "seed": 0, "hp": {}}
    torch.save({"model": models.build("small_cnn", 10, 1).state_dict(), "meta": meta}, path)
    return path.read_bytes()


def _checksums(modules) -> list[float]:
    return [float(t.double().sum()) for m in modules for t in list(m.parameters()) + list(m.buffers())]


SETUP_SPEC = {"defenses": ["saliency_detector"], "train_samples": 300, "batch_size": 50,
              "validation_samples": 200}


def _setup_rank(rank: int, world: int, init_file: str, out: str) -> None:
    from orchestrator.training import build_setup

    node, spec = Path(out) / f"node{rank}", parse(SETUP_SPEC)
    placed = _place_base(node, spec, "saliency_detector", 100 + rank)
    with gloo(rank, world, init_file):
        s = build_setup(spec, "saliency_detector", {"detector": "id"}, torch.device("cpu"), node,
                        parallel=TorchDistributed(torch.device("cpu")))
        torch.save({"sums": _checksums([s.defense.model, s.defense.net]), "placed": placed,
                    "fingerprint": s.defense.classifier_id}, Path(out) / f"setup{rank}.pt")


def test_every_rank_sets_up_from_rank_0_s_base_model(tmp_path):
    mp.start_processes(_setup_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    zero, one = (torch.load(tmp_path / f"setup{r}.pt", weights_only=True) for r in (0, 1))
    assert zero["placed"] != one["placed"]  # the nodes' own base models differed
    # every rank loaded rank 0's (written into rank 1's node folder), so the weights and what
    # setup derives from them (here the detector's classifier fingerprint) are the same
    from orchestrator.training import base_checkpoint

    spec = parse(SETUP_SPEC)
    request = registry.get("saliency_detector").base_model(None)
    assert base_checkpoint(spec, request, tmp_path / "node1").read_bytes() == zero["placed"]
    assert zero["sums"] == one["sums"] and zero["fingerprint"] == one["fingerprint"]


# --- per-rank loops that stop after N examples agree on their collectives ---------------------

SAD_SPEC = {"defenses": ["sad"], "train_samples": 600, "batch_size": 128}


def _sad_setup(node: Path, parallel):
    from orchestrator.training import build_setup

    spec = parse(SAD_SPEC)
    _place_base(node, spec, "sad", 100)
    return build_setup(spec, "sad", {}, torch.device("cpu"), node, parallel=parallel)


def _bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _sad_rank(rank: int, world: int, init_file: str, out: str) -> None:
    with gloo(rank, world, init_file, 60):
        parallel = TorchDistributed(torch.device("cpu"), sync_batchnorm=True)
        s = _sad_setup(Path(out) / f"node{rank}", parallel)
        train(s, 1, parallel=parallel)  # SAD's BN pass: bn_samples=256 of batches 43/43/42
        torch.save(_bn_stats(s.defense.model), Path(out) / f"bn{rank}.pt")


def test_sad_bn_pass_on_unequal_shards_neither_hangs_nor_differs_from_one_process(tmp_path):
    mp.start_processes(_sad_rank, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3,
                       start_method="spawn")  # a hang ends in gloo's 60 s timeout: an error
    one = _sad_setup(tmp_path / "alone", SingleProcess())
    train(one, 1)
    ref = _bn_stats(one.defense.model)
    for rank in range(3):
        got = torch.load(tmp_path / f"bn{rank}.pt", weights_only=True)
        for k, v in ref.items():
            # float32: the shards' input-gradient steps round differently from the whole
            # batch's (seen: 4e-4 relative); ranks counting their own shards would have taken
            # 774 images instead of 256, statistics some percent apart (and hung first)
            assert torch.allclose(got[k].double(), v.double(), rtol=2e-3, atol=1e-4), (rank, k)


FS_SPEC = {"defenses": ["feature_squeezing"], "train_samples": 300, "batch_size": 100,
           "validation_samples": 500}


def _fs_rank(rank: int, world: int, init_file: str, out: str) -> None:
    from orchestrator.training import build_setup

    node, spec = Path(out) / f"node{rank}", parse(FS_SPEC)
    _place_base(node, spec, "feature_squeezing", 100 + rank)  # rank 0's is the one used
    with gloo(rank, world, init_file, 60):
        parallel = TorchDistributed(torch.device("cpu"))
        s = build_setup(spec, "feature_squeezing", {}, torch.device("cpu"), node, parallel=parallel)
        train(s, 1, parallel=parallel)  # the calibrating epoch
        torch.save(torch.tensor(s.defense.threshold), Path(out) / f"threshold{rank}.pt")


def test_a_detector_threshold_on_ranks_is_the_one_process_threshold(tmp_path):
    from orchestrator.training import build_setup

    mp.start_processes(_fs_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    spec = parse(FS_SPEC)
    _place_base(tmp_path / "alone", spec, "feature_squeezing", 100)  # rank 0's base model
    s = build_setup(spec, "feature_squeezing", {}, torch.device("cpu"), tmp_path / "alone")
    train(s, 1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"threshold{rank}.pt", weights_only=True).item()
        # float32 kernels with another thread count differ in the last bits (seen: 4e-6);
        # calibrating on a rank's 1/N of the images would move the quantile itself
        assert got == pytest.approx(s.defense.threshold, rel=1e-4), (rank, got, s.defense.threshold)


# ------------------------------------------------------------------ sharded evaluation
EVAL_N, EVAL_CURVE = 61, 31  # shards of 31/30 at ε = 0.3 and 16/15 on the curve's points


def _eval_setup(weights: Path):
    """A trained small_cnn in float64 (no last-bit prediction flips between batch sizes)
    behind the standard defense, the evaluation spec, and its test points."""
    from defenses.evaluation.benchmark import EvalSpec
    from defenses.evaluation.masking import MaskingConfig

    model = Float64(models.build("small_cnn", 10, 1))
    model.load_state_dict(torch.load(weights, weights_only=True))
    cls = registry.get("standard")
    d = cls(model, cls.make_params({}), ThreatModel(eps=0.3))
    spec = EvalSpec(eps=(0.3, 0.1), attacks=("fgsm", "pgd-5"), adaptive=False,
                    curve_samples=EVAL_CURVE, masking=MaskingConfig(samples=12, large_eps=0.5),
                    batch_size=256)
    ds = mnist()
    return d, spec, (data_lib.as_float(ds.test_x[:EVAL_N]), ds.test_y[:EVAL_N])


def _eval_rank(rank: int, world: int, init_file: str, out: str) -> None:
    from defenses.evaluation.benchmark import evaluate

    patch_randomness(setattr)  # random starts as a function of the example, not of the shard
    d, spec, data = _eval_setup(Path(out) / "weights.pt")
    with gloo(rank, world, init_file, 60):
        parallel = TorchDistributed(torch.device("cpu"))
        report = evaluate(d, data, spec, shard=parallel.eval_shard())
    assert (report is None) == (rank != 0)
    if report is not None:
        torch.save({eps: (r.robust_mask, r.acc, r.broken_by, r.clean_acc, r.n)
                    for eps, r in report.results.items()}, Path(out) / "sharded.pt")


def test_an_evaluation_sharded_over_ranks_is_the_one_process_evaluation(tmp_path, monkeypatch):
    """Each of 2 ranks attacks its share of the test points; rank 0's merged report (masks,
    per-attack accuracies and counts at every ε of the curve) is one process's."""
    from defenses.evaluation.benchmark import evaluate

    torch.manual_seed(0)
    model = models.build("small_cnn", 10, 1)
    ds = mnist()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for x, y in data_lib.batches(ds.train_x[:600], ds.train_y[:600], 50, shuffle=False):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(Float64(model).state_dict(), tmp_path / "weights.pt")
    mp.start_processes(_eval_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    patch_randomness(monkeypatch.setattr)
    d, spec, data = _eval_setup(tmp_path / "weights.pt")
    alone = evaluate(d, data, spec).results
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=False)
    assert list(sharded) == list(alone)
    for eps, (mask, acc, broken_by, clean, n) in sharded.items():
        ref = alone[eps]
        assert n == ref.n == (EVAL_N if eps == 0.3 else EVAL_CURVE)
        assert torch.equal(mask, ref.robust_mask), eps
        assert broken_by == ref.broken_by and clean == pytest.approx(ref.clean_acc)
        assert acc == pytest.approx(ref.acc), eps
    # not a vacuous comparison: the attacks broke points and some survived
    assert 0 < alone[0.3].robust_mask.sum() < alone[0.3].n and sum(alone[0.3].broken_by.values()) > 0
