"""B3: orchestration overhead of the real sweep CLI, per trial.

Two sweeps of the same short trials (N₁ and N₂ of them) through
``python orchestrator/sweep.py --spec FILE --out DIR --no-dashboard --address local``, each in a
fresh process. Overhead = wall time − Σ(train_seconds + eval_seconds) from trials.csv; per
trial = overhead / N, and the marginal cost of one more trial = Δoverhead / ΔN (which leaves
out the fixed start: Python imports, Ray start, the exports).

Next to them, the floor of the Ray Train path: ``TorchTrainer.fit()`` of a loop that does one
all-reduce and returns, with the same workers, timed in its own fresh Ray
(``python -m bench.b3_overhead --floor N``): what any trial that starts a fresh trainer pays."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench.common import load_line, section, sweep_cli, table

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"tiny": dict(ns=(1,), workers=(1,), floor_fits=0), "quick": dict(ns=(1, 4), workers=(1,), floor_fits=0),
            "full": dict(ns=(2, 8), workers=(1, 2), floor_fits=4)}


def spec(n: int, workers: int) -> dict:
    return {"name": f"bench-b3-{n}-{workers}", "dataset": "mnist5k", "model": "small_cnn", "epochs": 1,
            "train_samples": 64, "eval_samples": 32, "batch_size": 32,
            "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "masking_samples": 0, "final_eval": "none"},
            "defenses": {"standard": {"trials": n}}, "search": "random",
            "resources": {"cpus_per_trial": 1, "workers_per_trial": workers}}


def sweep(n: int, workers: int, tmp: Path) -> tuple[float, float, int]:
    """(wall s, Σ trial compute s, completed trials) of one sweep in a fresh process."""
    wall, df = sweep_cli(spec(n, workers), tmp, f"out-{n}-{workers}")
    done = df[df["status"] == "completed"]
    return wall, float((done["train_seconds"] + done["eval_seconds"]).sum()), len(done)


def _noop_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))
    ray.train.report({"done": 1})


def floor_seconds(fits: int, workers: int = 2) -> list[float]:
    """Wall seconds of ``fits`` consecutive bare ``TorchTrainer.fit()`` calls in one Ray, run
    the way trials run them (Ray Train V2, the controller's poll interval the sweep sets)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.tune_adapter import poll_train_workers_often

    poll_train_workers_often()
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    seconds = []
    with tempfile.TemporaryDirectory(prefix="bench-b3-floor-") as storage:
        for i in range(fits):
            t0 = time.perf_counter()
            TorchTrainer(_noop_loop, torch_config=TorchConfig(backend="gloo"),
                         scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
                         run_config=ray.train.RunConfig(name=f"floor-{i}", storage_path=storage)).fit()
            seconds.append(time.perf_counter() - t0)
    ray.shutdown()
    return seconds


def floor(fits: int) -> list[float]:
    """``floor_seconds`` in a fresh process (a fresh Ray, as each sweep gets)."""
    proc = subprocess.run([sys.executable, "-m", "bench.b3_overhead", "--floor", str(fits)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"floor run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(mode: str) -> str:
    cfg = SETTINGS[mode]
    started = load_line()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-b3-") as tmp:
        for workers in cfg["workers"]:
            results = []
            for n in cfg["ns"]:
                try:
                    wall, compute, done = sweep(n, workers, Path(tmp))
                except RuntimeError as e:
                    notes.append(f"workers_per_trial={workers}, N={n}: {e}")
                    continue
                results.append((n, wall - compute))
                rows.append([workers, n, done, f"{wall:.1f}", f"{compute:.1f}", f"{(wall - compute) / n:.1f}", ""])
            if len(results) == 2:
                (n1, o1), (n2, o2) = results
                marginal = (o2 - o1) / (n2 - n1)
                target = 1.0 if workers == 1 else 5.0
                verdict = ("not measurable: the overhead changed more with the load than with N"
                           if marginal < 0 else "met" if marginal <= target
                           else f"missed by {marginal - target:.1f} s")
                rows.append([workers, f"Δ {n1}→{n2}", "", "", "", "",
                             f"marginal {marginal:.1f} s/trial (target ≤ {target:g} s: {verdict}); "
                             f"fixed start {o1 - n1 * marginal:.1f} s"])
    if max(cfg["workers"]) > 1:
        try:
            fits = floor(cfg["floor_fits"])
            later = fits[1:] or fits  # the first fit also pays Ray Train's one-time imports
            rows.append([2, "bare `TorchTrainer`", len(fits), "", "", "",
                         f"floor: {statistics.median(later):.1f} s per fit (median of {len(later)} after the "
                         f"first; first {fits[0]:.1f} s): a trainer whose loop only all-reduces once"])
        except RuntimeError as e:
            notes.append(f"bare TorchTrainer floor: {e}")
    body = ("Trials: `standard`, 1 epoch on 64 images, evaluation of 32 images with FGSM, "
            "masking checks off, random search, 1 CPU per trial; each sweep a fresh process "
            "(`--address local`).\n\n"
            + table(["workers/trial", "N trials", "completed", "sweep wall s", "Σ train+eval s",
                     "(wall − compute)/N s", "marginal cost"], rows)
            + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else ""))
    return section(f"B3 orchestration overhead (mode {mode})",
                   f"nice -n 10 python bench/run.py --only b3{'' if mode == 'full' else ' --' + mode}",
                   body, started)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor"]:
        print(json.dumps(floor_seconds(int(sys.argv[2]))))
