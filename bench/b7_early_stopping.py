"""B7: early stopping — ``scheduler: mo_asha`` against no stopping, same trials.

Two sweeps through the real CLI (``python orchestrator/sweep.py --spec FILE --out DIR
--no-dashboard --address local``, each in a fresh process): pgd_at and trades, N trials each,
E epochs on mnist5k, random search with the same seed, so both sweeps draw the same
configurations and differ only in the scheduler. Reported: trial-seconds (Σ train + eval
seconds over every trial, the per-epoch validation of mo_asha included), the sweeps' wall
time, and the hypervolume of each sweep's front (clean, robust; reference (0, 0)), both on
the search-time cascade. Target: ≥ 95 % of the hypervolume with ≤ 55 % of the trial-seconds."""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import load_line, section, sweep_cli, table

SETTINGS = {"tiny": dict(trials=2, epochs=2, train=200, eval=50),
            "quick": dict(trials=8, epochs=6, train=400, eval=100),
            "full": dict(trials=16, epochs=6, train=600, eval=200)}


def spec(cfg: dict, scheduler: str) -> dict:
    return {"name": f"bench-b7-{scheduler}", "dataset": "mnist5k", "model": "small_cnn",
            "epochs": cfg["epochs"], "train_samples": cfg["train"], "eval_samples": cfg["eval"],
            "batch_size": 50, "search": "random", "seed": 7,
            "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 3},
            "threat_model": {"eps": 0.3, "attacks": ["fast"], "train_steps": 3, "eval_eps": [0.3],
                             "masking_samples": 0, "final_eval": "none"},
            "defenses": {"pgd_at": {"trials": cfg["trials"]}, "trades": {"trials": cfg["trials"]}}}


def run(mode: str) -> str:
    from orchestrator.aggregate import hypervolume, pareto_front

    cfg = SETTINGS[mode]
    started = load_line()
    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("none", "mo_asha"):
            wall, df = sweep_cli(spec(cfg, scheduler), Path(tmp), scheduler)
            seconds = float((df.train_seconds.fillna(0) + df.eval_seconds.fillna(0)).sum())
            hv = float(hypervolume(pareto_front(df)))
            stopped = df[df.status == "stopped"]
            measured[scheduler] = (seconds, hv)
            rows.append([scheduler, len(df), len(stopped),
                         ", ".join(f"{e}" for e in sorted(stopped.epochs.astype(int))) or "—",
                         f"{seconds:.0f}", f"{wall:.0f}", f"{hv:.4f}"])
    (s0, h0), (s1, h1) = measured["none"], measured["mo_asha"]
    body = (f"pgd_at and trades, {cfg['trials']} trials each, {cfg['epochs']} epochs on {cfg['train']} "
            f"mnist5k images, train_steps 3, search-time cascade `fast` on {cfg['eval']} test images at "
            "ε = 0.3, random search, seed 7 (the same configurations in both sweeps); mo_asha: "
            "grace_period 1, reduction_factor 3 (rungs at epochs 1 and 3). Target: ≥ 95 % of the "
            "hypervolume with ≤ 55 % of the trial-seconds.\n\n"
            + table(["scheduler", "trials", "stopped", "stopped at epoch", "trial-seconds", "wall s",
                     "front hypervolume"], rows)
            + f"\n\nmo_asha / none: trial-seconds **{s1 / s0:.2f}×**, hypervolume **{h1 / h0:.3f}×**")
    return section(f"B7 early stopping (mode {mode})",
                   f"python bench/run.py --only b7{'' if mode == 'full' else ' --' + mode}", body, started)


if __name__ == "__main__":
    print(run("tiny"))
