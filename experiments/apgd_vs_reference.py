"""Our early-stopping APGD (defenses.attacks.apgd) next to torchattacks' APGD and the authors'
own (``pyautoattack``: ``pip install pyautoattack``), on a sweep's trial checkpoints: robust
accuracy of the classifier each attack leaves, seconds, and the L∞ size of the perturbation.

    python experiments/apgd_vs_reference.py RUN TRIAL[,TRIAL...] [--samples 500] [--eps 0.3]
                                             [--steps 100] [--targets 3]

Each trial is restored as the sweep's final evaluation restores it (base models from the run);
the attacks target ``defense.predictor()`` on the first ``--samples`` test images, one thread.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from defenses.attacks import frozen_eval  # noqa: E402
from defenses.attacks.apgd import APGD  # noqa: E402
from defenses.attacks.external import torchattacks  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, device_of  # noqa: E402
from orchestrator.evaluate import eval_data, load_spec_file, local_checkpoint, restore  # noqa: E402
from orchestrator.records import load_records  # noqa: E402


def attacks(model, eps: float, steps: int, targets: int) -> dict:
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    return {
        f"ours apgd_ce-{steps}": lambda x, y: APGD(model, eps, steps, "ce")(x, y),
        f"torchattacks apgd_ce-{steps}": lambda x, y: torchattacks.APGD(
            model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0)(x, y),
        f"reference apgd_ce-{steps}": lambda x, y: APGDAttack(
            model, n_iter=steps, norm="Linf", eps=eps, loss="ce", n_restarts=1, seed=0,
            device=x.device).perturb(x, y),
        f"ours apgd_t-{steps}x{targets}": lambda x, y: APGD(model, eps, steps, "dlr", targets)(x, y),
        f"reference apgd_t-{steps}x{targets}": lambda x, y: APGDAttack_targeted(
            model, n_iter=steps, norm="Linf", eps=eps, n_restarts=1, n_target_classes=targets,
            seed=0, device=x.device).perturb(x, y),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("trials")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--targets", type=int, default=3)
    add_device_options(p, threads=1)
    args = p.parse_args(argv)
    try:
        device = device_of(args)
    except BadInput as e:
        p.error(str(e))
    spec = load_spec_file(args.run / "spec.json")
    records = {r.trial_id: r for r in load_records(args.run)}
    print("| trial | attack | robust acc | seconds | max L∞ |\n|---|---|---|---|---|")
    for tid in args.trials.split(","):
        s = restore(local_checkpoint(records[tid].checkpoint), spec, args.run, device)
        model = s.defense.predictor()
        x, y = eval_data(s, args.samples)
        with frozen_eval(s.defense.model):
            for name, attack in attacks(model, args.eps, args.steps, args.targets).items():
                start = time.perf_counter()
                adv = attack(x, y)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    acc = (model(adv).argmax(1) == y).float().mean().item()
                print(f"| {s.defense_name} {tid} | {name} | {100 * acc:.1f} % | {seconds:.1f} | "
                      f"{(adv - x).abs().max().item():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
