"""B5: Pareto front + hypervolume of n synthetic trial rows (``orchestrator.aggregate``), on
two objectives (clean_acc, robust_acc) and on three (with ``cost``, minimized)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.common import interleave, load_line, section, stats, table
from orchestrator.aggregate import hypervolume, pareto_front

SETTINGS = {"tiny": dict(ns=(1_000, 10_000), reps=1), "quick": dict(ns=(10_000, 100_000, 1_000_000), reps=3),
            "full": dict(ns=(10_000, 100_000, 1_000_000), reps=7)}


def rows(n: int, seed: int = 0) -> pd.DataFrame:
    """Trial rows shaped like trials.csv: accuracies with the usual clean/robust trade-off
    (robust falls as clean rises, plus noise), a few failed and NaN rows."""
    rng = np.random.default_rng(seed)
    clean = rng.uniform(0.5, 1.0, n)
    robust = np.clip(1.0 - clean + rng.normal(0, 0.15, n), 0, 1)
    status = np.where(rng.random(n) < 0.02, "failed", "completed")
    robust[rng.random(n) < 0.01] = np.nan
    # cost grows with robustness (more attack steps in training buy it), with spread
    cost = 100 * (1 + robust) * rng.lognormal(0, 0.5, n)
    return pd.DataFrame({"trial_id": np.arange(n).astype(str), "defense": "pgd_at",
                         "status": status, "clean_acc": clean, "robust_acc": robust, "cost": cost})


OBJECTIVE_SETS = {"2": ("clean_acc", "robust_acc"), "3": ("clean_acc", "robust_acc", "cost")}


def run(mode: str) -> str:
    cfg = SETTINGS[mode]
    started = load_line()
    out = []
    for n in cfg["ns"]:
        df = rows(n)
        for k, objs in OBJECTIVE_SETS.items():
            ref = (0.0, 0.0, 1.1 * float(df["cost"].max()))[:len(objs)]  # one for front and all rows
            t = interleave({"front": lambda: pareto_front(df, objs),
                            "hv": lambda: hypervolume(df, objs, ref),
                            "both": lambda: hypervolume(pareto_front(df, objs), objs, ref)}, cfg["reps"])
            both = stats(t["both"])
            out.append([f"{n:,}", k, stats(t["front"]).fmt("ms", 1e3), stats(t["hv"]).fmt("ms", 1e3),
                        both.fmt("ms", 1e3), len(pareto_front(df, objs)),
                        "—" if n != 100_000 else
                        ("**yes**" if both.median <= 1.0 else f"**no** ({both.median:.2f} s)")])
    body = ("2 objectives (clean_acc, robust_acc) or 3 (and `cost`, minimized; moocore's "
            "non-dominated filter and hypervolume), 2 % failed and 1 % NaN rows; 'front + hv' = "
            "`hypervolume(pareto_front(df))`. Target: 100k rows ≤ 1 s.\n\n"
            + table(["rows", "objectives", "pareto_front", "hypervolume (all rows)", "front + hv",
                     "front size", "100k ≤ 1 s"], out))
    return section(f"B5 aggregator scale (mode {mode})",
                   f"nice -n 10 python bench/run.py --only b5{'' if mode == 'full' else ' --' + mode}",
                   body, started)
