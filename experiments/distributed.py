"""Scaling of one trial on this machine: training throughput (images/s) of PGD-AT on
mnist5k/small_cnn with 1 CPU worker, 1 worker with 2 threads, and 2 data-parallel CPU workers
(Ray Train, gloo), each run as a real one-trial sweep. Writes the table to docs/distributed.md.

    python experiments/distributed.py [--train-samples 2000] [--epochs 2] [--out docs/distributed.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
from orchestrator import sweep  # noqa: E402

SETUPS = [  # (label, resources)
    ("1 worker, 1 thread", {"workers_per_trial": 1, "cpus_per_trial": 1}),
    ("1 worker, 2 threads", {"workers_per_trial": 1, "cpus_per_trial": 2}),
    ("2 workers (DDP, gloo), 1 thread each", {"workers_per_trial": 2, "cpus_per_trial": 1}),
]


def spec_for(args, resources: dict) -> dict:
    return {"name": "scaling", "dataset": "mnist5k", "model": "small_cnn", "epochs": args.epochs,
            "train_samples": args.train_samples, "eval_samples": 100, "batch_size": args.batch_size,
            "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": args.train_steps},
            "defenses": {"pgd_at": {"trials": 1, "space": {"lr": [1e-3], "clean_weight": [0.0]}}},
            "resources": resources}


def measure(args, label: str, resources: dict, work: Path) -> dict:
    folder = work / label.split()[0] / str(resources["cpus_per_trial"])
    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_for(args, resources)))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rc = sweep.main(["--spec", str(spec), "--out", str(folder / "run"), "--no-dashboard"])
    wall = time.perf_counter() - t0
    row = pd.read_csv(folder / "run" / "trials.csv").iloc[0]
    if rc != 0 or row.status != "completed":
        raise SystemExit(f"{label}: the trial did not complete: {row.error}")
    images = args.train_samples * int(row.epochs)
    return {"setup": label, "images_per_s": images / row.train_seconds, "train_s": row.train_seconds,
            "trial_wall_s": wall, "load": load}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--out", default="docs/distributed.md")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for label, resources in SETUPS:
            rows.append(measure(args, label, resources, Path(work)))
            print(rows[-1], flush=True)
    ray.shutdown()
    base = rows[0]["images_per_s"]
    lines = ["| setup | train images/s | speed-up | training s | whole sweep s (incl. start-up, eval) | load avg (1 min) at start |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}× | "
                     f"{r['train_s']:.1f} | {r['trial_wall_s']:.1f} | {r['load']:.1f} |")
    command = (f"python experiments/distributed.py --train-samples {args.train_samples} --epochs {args.epochs} "
               f"--batch-size {args.batch_size} --train-steps {args.train_steps}")
    text = TEMPLATE.format(command=command, table="\n".join(lines), args=args, cpus=os.cpu_count())
    out = Path(args.out)
    if out.is_file() and KEPT in out.read_text():
        # the measured section is regenerated; what later sessions wrote after it is kept
        text = text[:text.index(KEPT)] + out.read_text()[out.read_text().index(KEPT):]
    out.write_text(text)
    print(text)


KEPT = "## How a data-parallel trial runs"
TEMPLATE = """# Distributed trials

## Scaling on this machine

Command: `{command}`

One PGD-AT trial (PGD-{args.train_steps} training attack, ε = 0.3) on mnist5k / small_cnn,
{args.train_samples} training images, {args.epochs} epochs, global batch {args.batch_size}, Adam lr 1e-3,
each run as a real one-trial sweep on a local Ray with 2 CPUs ({cpus} cores on the machine).
Throughput = training images / the trial's training seconds (rank 0's clock for the
data-parallel run: it includes waiting for the all-reduce of every step and the per-epoch
metric reduction); the start-up of the Ray Train workers and the evaluation are in the
"whole sweep" column only.

{table}

The machine is shared: the load column is what other processes were asking of its 2 cores
when each run started (1-minute load average); speed-ups measured under load are noisy and
lower than on an idle machine. No GPU was lent to this session, so there is no GPU row and no
measurement of fractional-GPU packing.

## How a data-parallel trial runs

* `resources.workers_per_trial: N > 1`: the Tune trial function starts a Ray Train
  `TorchTrainer` with N workers (gloo on CPU, NCCL on GPU) and relays what rank 0 reports
  (metrics already averaged over the ranks, and the checkpoint) to Tune, so that Tune holds a
  real checkpoint after every epoch. The trial function itself holds no CPU (one byte of
  memory: Tune cannot place a trial that asks for nothing), the workers hold one placement
  group; the sweep caps concurrent trials at what the cluster can hold.
* Every worker runs the same `run_trial` and the same training loop as a one-process trial
  (`orchestrator.training.train`), given a `TorchDistributed` (orchestrator/distributed.py):
  every rank walks the same seeded global batches and takes its share of each; it crafts the
  adversarial examples of its share; before each optimizer step the gradients are combined as
  Σ_r (n_r / n) g_r in one all-reduce (the gradient of the global batch for a per-batch mean
  loss); rank 0's BatchNorm buffers are broadcast after each step; metrics are averaged over
  the ranks and a stop requested by any rank stops them all; rank 0 checkpoints; every rank
  evaluates its share of the test points.
* Not `DistributedDataParallel`: adversarial training calls the model in ways DDP's reducer
  cannot follow (an input gradient in train mode for FGSM-RS, two forwards before one backward
  for TRADES, K frozen forwards for PGD, BatchNorm re-estimation under `no_grad` for SAD).
  Reducing the gradients at the optimizer is indifferent to all of them.
* `resources.sync_batchnorm: true` replaces BatchNorm by a synchronized BatchNorm computing
  the statistics of the global batch with a differentiable all-reduce (`torch.nn.SyncBatchNorm`
  refuses CPU tensors). Its backward weights each rank's part like the optimizer does, so
  uneven shares stay exact.
* Checked (tests/test_distributed.py): 2 gloo ranks with global batch B end one epoch with the
  weights of 1 process with batch B to 1e-5 for standard training, PGD-AT, TRADES and FGSM-RS
  (BatchNorm synchronized, uneven shares 21/20), computing in float64; through a real sweep
  (Ray Train inside Tune, float32) within 1e-4. In float32 a sign-gradient attack turns a
  last-bit difference of a near-zero input gradient into a flipped step, so adversarial
  training is equal only up to such flips under any change of batch split.

## Fault tolerance

Checked in tests/test_fault_tolerance.py on a 3-node Ray cluster simulated on this machine
(`ray.cluster_utils.Cluster`): a worker node killed mid-trial, the trial resumes on the other
node from its last epoch checkpoint and ends with exactly the numbers of an uninterrupted run
(the RNG is reseeded from (seed, epoch) every epoch, so a resumed epoch draws what the
uninterrupted one drew); the driver killed mid-sweep, `--resume` finishes it with every trial
once, interrupted trials continue from their newest persisted checkpoint (found in the trial's
folder: Tune's own experiment state can be ~10 s older), a trial that had finished reports its
stored record instead of running again, and the Optuna study holds each trial once; a trial
that fails every time is retried `max_failures` times and recorded failed with its error.
"""


if __name__ == "__main__":
    main()
