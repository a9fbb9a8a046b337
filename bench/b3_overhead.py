"""B3: orchestration overhead of the real sweep CLI, per trial.

Two sweeps of the same short trials (N₁ and N₂ of them) through
``python orchestrator/sweep.py --spec FILE --out DIR --no-dashboard --address local``, each in a
fresh process. Overhead = wall time − Σ(train_seconds + eval_seconds) from trials.csv; per
trial = overhead / N, and the marginal cost of one more trial = Δoverhead / ΔN (which leaves
out the fixed start: Python imports, Ray start, the exports)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from bench.common import load_line, section, table

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"tiny": dict(ns=(1,), workers=(1,)), "quick": dict(ns=(1, 4), workers=(1,)),
            "full": dict(ns=(2, 8), workers=(1, 2))}


def spec(n: int, workers: int) -> dict:
    return {"name": f"bench-b3-{n}-{workers}", "dataset": "mnist5k", "model": "small_cnn", "epochs": 1,
            "train_samples": 64, "eval_samples": 32, "batch_size": 32,
            "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "masking_samples": 0},
            "defenses": {"standard": {"trials": n}}, "search": "random",
            "resources": {"cpus_per_trial": 1, "workers_per_trial": workers}}


def sweep(n: int, workers: int, tmp: Path) -> tuple[float, float, int]:
    """(wall s, Σ trial compute s, completed trials) of one sweep in a fresh process."""
    spec_file, out = tmp / f"spec-{n}-{workers}.yaml", tmp / f"out-{n}-{workers}"
    spec_file.write_text(yaml.safe_dump(spec(n, workers)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "sweep.py"), "--spec", str(spec_file),
                           "--out", str(out), "--no-dashboard", "--address", "local"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    df = pd.read_csv(out / "trials.csv")
    done = df[df["status"] == "completed"]
    return wall, float((done["train_seconds"] + done["eval_seconds"]).sum()), len(done)


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
    body = ("Trials: `standard`, 1 epoch on 64 images, evaluation of 32 images with FGSM, "
            "masking checks off, random search, 1 CPU per trial; each sweep a fresh process "
            "(`--address local`).\n\n"
            + table(["workers/trial", "N trials", "completed", "sweep wall s", "Σ train+eval s",
                     "(wall − compute)/N s", "marginal cost"], rows)
            + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else ""))
    return section(f"B3 orchestration overhead (mode {mode})",
                   f"nice -n 10 python bench/run.py --only b3{'' if mode == 'full' else ' --' + mode}",
                   body, started)
