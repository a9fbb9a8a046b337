"""B7: early stopping — ``scheduler: mo_asha`` against no stopping, same trials.

Two sweeps through the real CLI (``python orchestrator/sweep.py --spec FILE --out DIR
--no-dashboard --address local``, each in a fresh process): pgd_at and trades, N trials each,
E epochs on mnist5k, random search with the same seed, so both sweeps draw the same
configurations and differ only in the scheduler. Reported: trial-seconds (Σ train + eval
seconds over every trial, the per-epoch validation of mo_asha included), Σ cost (the trials'
CPU-seconds, which another job on the machine does not inflate), the sweeps' wall time, and
the hypervolume of each sweep's front (clean, robust; reference (0, 0)), both on the
search-time cascade. mo_asha runs at each (grace_period, reduction_factor) of ``ARMS``.
Target: ≥ 95 % of the hypervolume with ≤ 55 % of the trial-seconds."""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import pandas as pd

from bench.common import load_line, section, sweep_cli, table

# train: training images per epoch; None = mnist5k's whole training split (3,744 after the 256
# validation images). The full mode trains on all of it: at 600 images an epoch is 12 steps of
# 50, and what a model shows after 12 steps says little about where it ends (measured, BENCHMARKS)
SETTINGS = {"tiny": dict(trials=2, epochs=2, train=200, eval=50),
            "quick": dict(trials=8, epochs=6, train=400, eval=100),
            "full": dict(trials=16, epochs=6, train=None, eval=200)}
# mo_asha's (grace_period, reduction_factor): the (rungs at epochs 1 and 3, a third of
# a rung goes on) and halving (rungs at 1, 2 and 4). A first cut at epoch 2 (grace 2) cost
# 0.85x the CPU-seconds on 600-image epochs (BENCHMARKS), above the time target by itself
ARMS = ((1, 3), (1, 2))


def spec(cfg: dict, scheduler: str, grace_period: int = 1, reduction_factor: float = 3,
         seed: int = 7) -> dict:
    return {"name": f"bench-b7-{scheduler}", "dataset": "mnist5k", "model": "small_cnn",
            "epochs": cfg["epochs"], "eval_samples": cfg["eval"],
            **({} if cfg["train"] is None else {"train_samples": cfg["train"]}),
            "batch_size": 50, "search": "random", "seed": seed,
            "scheduler": {"name": scheduler, "grace_period": grace_period,
                          "reduction_factor": reduction_factor},
            "threat_model": {"eps": 0.3, "attacks": ["fast"], "train_steps": 3, "eval_eps": [0.3],
                             "masking_samples": 0, "final_eval": "none"},
            "defenses": {"pgd_at": {"trials": cfg["trials"]}, "trades": {"trials": cfg["trials"]}}}


def run(mode: str, keep: Path | None = None, seed: int = 7, arms: tuple = ARMS) -> str:
    """The B7 section; ``keep``: a folder to leave the sweeps in (their trials' per-epoch
    results, for reading which configurations a rung stopped), else a temporary one;
    ``seed``: the random search's (another seed, other configurations); ``arms``: mo_asha's
    (grace_period, reduction_factor) pairs."""
    from orchestrator.aggregate import hypervolume, pareto_front

    cfg = SETTINGS[mode]
    started = load_line()
    rows, measured, fronts = [], {}, {}
    sweeps = [("none", 1, 3)] + [("mo_asha", g, r) for g, r in arms if g < cfg["epochs"]]
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory() as tmp:
        for scheduler, grace, factor in sweeps:
            name = scheduler if scheduler == "none" else f"mo_asha-g{grace}-r{factor}"
            wall, df = sweep_cli(spec(cfg, scheduler, grace, factor, seed), Path(tmp), name)
            seconds = trial_seconds(df)
            cost = float(df.cost.fillna(0).sum())
            hv = float(hypervolume(pareto_front(df)))
            stopped = df[df.status == "stopped"]
            measured[name] = (seconds, cost, hv)
            fronts[name] = _configurations(pareto_front(df))
            finished = _configurations(df[df.status == "completed"])
            s0, c0, h0 = measured["none"]
            rows.append([name if scheduler == "none" else f"mo_asha, grace {grace}, factor {factor:g}",
                         len(df), len(stopped),
                         ", ".join(f"{e}" for e in sorted(stopped.epochs.astype(int))) or "—",
                         f"{seconds:.0f} ({seconds / s0:.2f}×)", f"{cost:.0f} ({cost / c0:.2f}×)",
                         f"{wall:.0f}", f"{hv:.4f} ({hv / h0:.3f}×)",
                         f"{len(fronts['none'] & finished)} of {len(fronts['none'])}"])
    images = "all 3,744" if cfg["train"] is None else f"{cfg['train']}"
    body = (f"pgd_at and trades, {cfg['trials']} trials each, {cfg['epochs']} epochs on {images} "
            f"mnist5k training images, train_steps 3, search-time cascade `fast` on {cfg['eval']} test images at "
            f"ε = 0.3, random search, seed {seed} (the same configurations in every sweep); ratios are to "
            "no stopping. Target: ≥ 95 % of the hypervolume with ≤ 55 % of the trial-seconds.\n\n"
            + table(["scheduler", "trials", "stopped", "stopped at epoch", "trial-seconds",
                     "Σ cost (CPU-s)", "wall s", "front hypervolume",
                     "unstopped front's configurations that finished"], rows))
    command = f"python bench/run.py --only b7{'' if mode == 'full' else ' --' + mode}"
    if seed != 7 or arms != ARMS:
        command = (f"python -m bench.b7_early_stopping --mode {mode} --seed {seed} --arms "
                   + " ".join(f"{g},{r:g}" for g, r in arms))
    return section(f"B7 early stopping (mode {mode}{'' if seed == 7 else f', seed {seed}'})",
                   command, body, started)


def trial_seconds(df) -> float:
    """B7's trial-seconds of a sweep's trials.csv: Σ train + evaluation seconds."""
    return float((df.train_seconds.fillna(0) + df.eval_seconds.fillna(0)).sum())


def _configurations(df) -> set[tuple]:
    """Each row's (defense, hyperparameters): the same seed draws the same ones in every arm."""
    hp = sorted(c for c in df.columns if c.startswith("hp."))

    def value(v):  # NaN (an hp of the other defense) never equals itself: None instead
        return None if pd.isna(v) else round(float(v), 12) if isinstance(v, float) else v
    return {(d, *map(value, vals)) for d, *vals in df[["defense", *hp]].itertuples(index=False)}


def _arm(text: str) -> tuple[int, float]:
    grace, factor = text.split(",")
    return int(grace), float(factor)


if __name__ == "__main__":  # python -m bench.b7_early_stopping [--mode full] [--keep DIR] [--seed N] [--arms 1,2 ...]
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=list(SETTINGS), default="tiny")
    p.add_argument("--keep", type=Path, default=None, help="leave the sweeps in this folder")
    p.add_argument("--seed", type=int, default=7, help="the random search's seed")
    p.add_argument("--arms", type=_arm, nargs="+", default=list(ARMS),
                   help="mo_asha's GRACE,FACTOR pairs, e.g. 1,2 1,3")
    a = p.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    print(run(a.mode, a.keep, a.seed, tuple(a.arms)))
