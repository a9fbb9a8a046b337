"""Hold a sweep's Pareto front against AutoAttack run outside the project's cascade code.

For every member of ``RUN/pareto.csv``: restore its checkpoint (base models from the run, as
the sweep's final evaluation does), run the reference AutoAttack (Croce & Hein 2020, packaged on
PyPI as ``pyautoattack``: ``pip install pyautoattack``) on the same test images the final
evaluation used, judge its adversarials with the defense's ``predict`` (a detector's rejection
counts as defended), and print the front's ``robust_acc`` next to it.

    python experiments/front_vs_autoattack.py RUN [--components apgd-ce,apgd-t] [--samples N]
                                              [--json OUT] [--trials ID,ID]

``--components standard`` runs all four of AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)
at its own budgets; FAB-T alone takes many minutes per model on one CPU core, so the default is
its two APGD attacks at its budgets (100 steps, 9 target classes).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from defenses.attacks import frozen_eval  # noqa: E402
from defenses.core.base import predict_labels  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, device_of  # noqa: E402
from orchestrator.evaluate import eval_data, load_spec_file, local_checkpoint, restore  # noqa: E402


def reference_autoattack(defense, x, y, eps: float, components: str) -> float:
    from pyautoattack import AutoAttack

    aa = AutoAttack(defense.predictor(), norm="Linf", eps=eps, version="standard", seed=0)
    if components != "standard":
        aa.attacks_to_run = components.split(",")
    with frozen_eval(defense.model):
        adv, _ = aa.run_standard_evaluation(x, y, batch_size=250)
        pred, rej = predict_labels(defense, adv, 250)
        clean_pred, clean_rej = predict_labels(defense, x, 250)
    ok = (clean_pred == y) & ~clean_rej & ((pred == y) | rej)
    return ok.float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--components", default="apgd-ce,apgd-t")
    p.add_argument("--samples", type=int, default=None,
                   help="test images (default: the run's final_samples, else all)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--trials", default=None,
                   help="comma-separated trial ids of RUN/trials.csv instead of pareto.csv's members")
    add_device_options(p, threads=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        device = device_of(args)
    except BadInput as e:
        p.error(str(e))
    spec = load_spec_file(args.run / "spec.json")
    if args.trials:
        rows_of = pd.read_csv(args.run / "trials.csv", dtype={"trial_id": str})
        front = rows_of[rows_of.trial_id.isin(args.trials.split(","))]
    else:
        front = pd.read_csv(args.run / "pareto.csv", dtype={"trial_id": str})
    rows = []
    for _, r in front.iterrows():
        s = restore(local_checkpoint(r.checkpoint), spec, args.run, device)
        n = args.samples or spec.final_samples or len(s.data.test_y)
        x, y = eval_data(s, n)
        t0 = time.perf_counter()
        aa = reference_autoattack(s.defense, x, y, spec.threat_model.eps, args.components)
        row = {"trial_id": r.trial_id, "defense": r.defense, "n": n,
               "final_evaluated": bool(r.final_evaluated), "robust_acc": float(r.robust_acc),
               "robust_acc_search": float(r.robust_acc_search), "autoattack": aa,
               "gap_pts": 100 * (float(r.robust_acc) - aa), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{r.trial_id} {r.defense:18s} n={n} front robust {100 * r.robust_acc:.1f}% "
              f"(search-time {100 * r.robust_acc_search:.1f}%) | reference AutoAttack "
              f"({args.components}) {100 * aa:.1f}% | front − AA {row['gap_pts']:+.1f} pts "
              f"({row['seconds']:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
