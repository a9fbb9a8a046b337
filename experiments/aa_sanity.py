"""Issue 10's sanity check on a longer-trained PGD-AT: is AutoAttack within a few points of
PGD-40? Trains pgd_at through the trial code (mnist5k, all 4,000 training images, PGD-10,
10 epochs), then evaluates the first N test images with PGD-40, PGD-40 × 5 restarts and a
reduced AutoAttack cascade (APGD-CE-50, APGD-T-50×3, FAB-T-50×3, Square-500).

    python experiments/aa_sanity.py [--epochs 10] [--train-steps 10] [--schedule constant|cyclic]
                                    [--lr 1e-3] [--samples 200] [--autoattack reduced|standard]
                                    [--run-dir runs/aa_sanity]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from defenses.core import data as data_lib  # noqa: E402
from defenses.attacks import PGD  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from orchestrator.cli import add_device_options, parse_with_device  # noqa: E402
from orchestrator.spec import parse  # noqa: E402
from orchestrator.training import build_setup, train  # noqa: E402

REDUCED_AA = ["apgd_ce-50", "apgd_t-50x3", "fab_t-50x3", "square-500"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--schedule", choices=["constant", "cyclic"], default="constant",
                   help="learning rate: constant, or fast_adversarial's 0 -> lr -> 0 triangle")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the peak if cyclic)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--autoattack", choices=["reduced", "standard"], default="reduced",
                   help="reduced budgets (APGD 50 steps, 3 targets, Square 500) or AutoAttack's own")
    p.add_argument("--run-dir", default="runs/aa_sanity")
    add_device_options(p, threads=1)
    args, device = parse_with_device(p)
    spec = parse({"name": "aa-sanity", "dataset": "mnist5k", "model": "small_cnn",
                  "epochs": args.epochs, "batch_size": 100, "optimizer": {"name": "adam", "lr": args.lr, "schedule": args.schedule},
                  "threat_model": {"eps": 0.3, "attacks": ["pgd-40"], "train_steps": args.train_steps},
                  "defenses": ["pgd_at"]})
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    s = build_setup(spec, "pgd_at", {"clean_weight": 0.0}, device, run_dir)
    # the trained weights are kept: evaluating again (e.g. on more images) does not retrain
    weights = run_dir / f"pgd_at-e{args.epochs}-k{args.train_steps}-{args.schedule}-lr{args.lr:g}.pt"
    if weights.is_file():
        s.defense.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        train(s, spec.epochs)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(s.defense.model.state_dict(), weights)
    out: dict = {"settings": vars(args), "train_s": round(time.perf_counter() - t0, 1)}
    x = data_lib.as_float(s.data.test_x[:args.samples], device)
    y = s.data.test_y[:args.samples].to(device)
    lists = {"pgd-40": ["pgd-40"],
             "pgd-40 x5 restarts": [PGD(s.defense.predictor(), 0.3, steps=40, restarts=5)],
             **({"reduced AutoAttack": REDUCED_AA} if args.autoattack == "reduced"
                else {"AutoAttack standard": ["standard"]})}
    for name, attacks in lists.items():
        torch.manual_seed(0)
        r = benchmark(s.defense, x, y, 0.3, attacks, batch_size=min(args.samples, 500), adaptive=False)
        out[name] = {"clean": r.clean_acc, "robust": r.robust_acc, "acc": r.acc}
        print(f"{name}: clean {r.clean_acc:.1%}, robust {r.robust_acc:.1%} {r.acc}", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
