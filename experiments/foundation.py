"""The Foundation issue's numbers: mnist5k/small_cnn, L∞ ε=0.3, evaluated on all 1,000 test
images with the worst case of FGSM, PGD-40 and PGD-CW-40 (plus AutoAttack with --autoattack).

    python experiments/foundation.py [--epochs 10] [--autoattack] [--out docs/foundation.md]
                                     [--device cpu|cuda|cuda:N] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.cli import add_device_options, parse_with_device, trial_resources  # noqa: E402
from orchestrator.spec import parse  # noqa: E402
from orchestrator.trial import run_trial  # noqa: E402


def spec_for(epochs: int, attacks: list[str], train_steps: int, resources: dict):
    return parse({"name": "foundation", "dataset": "mnist5k", "model": "small_cnn", "epochs": epochs,
                  "batch_size": 50, "optimizer": {"name": "adam", "lr": 1e-3},
                  "threat_model": {"eps": 0.3, "attacks": attacks, "train_steps": train_steps},
                  "defenses": ["standard", "pgd_at"], "resources": resources})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--autoattack", action="store_true")
    p.add_argument("--out", default="docs/foundation.md")
    # 1 thread by default: run_trial sets cpus_per_trial's (1) over the 2 this script used to set
    add_device_options(p, threads=1)
    args, device = parse_with_device(p)
    attacks = ["fgsm", "pgd-40", "pgd_cw-40"] + (["autoattack"] if args.autoattack else [])
    spec = spec_for(args.epochs, attacks, args.train_steps, trial_resources(device, args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for defense in ["standard", "pgd_at"]:
            t0 = time.time()
            rec = run_trial({"defense": defense, "hp": {}, "spec": spec, "run_dir": run_dir})
            rows.append((defense, rec, time.time() - t0))
            print(defense, rec.status, rec.clean_acc, rec.robust_acc, rec.acc, rec.error, flush=True)
    cols = list(rows[0][1].acc)
    lines = [f"| defense | epochs | clean | {' | '.join('after ' + c for c in cols)} | robust (worst case) | train s |",
             "|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for defense, rec, _ in rows:
        accs = " | ".join(f"{100 * rec.acc[c]:.1f} %" for c in cols)
        lines.append(f"| {defense} | {rec.epochs} | {100 * rec.clean_acc:.1f} % | {accs} | "
                     f"{100 * rec.robust_acc:.1f} % | {rec.train_seconds:.0f} |")
    text = ("# Foundation numbers (mnist5k / small_cnn, L∞ ε = 0.3)\n\n"
            f"Command: `python experiments/foundation.py --epochs {args.epochs} --train-steps {args.train_steps}"
            f"{' --autoattack' if args.autoattack else ''}`\n\n"
            f"Training: Adam lr 1e-3, batch 50, {args.epochs} epochs on the 4,000 training images; PGD-AT "
            f"trains on PGD-{args.train_steps} (step 2.5ε/K). Evaluation: all 1,000 test images, attacks run as "
            "a cascade (each column is the robust accuracy after that attack and all before it), so the "
            "last column is the per-example worst case.\n\n" + "\n".join(lines) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
