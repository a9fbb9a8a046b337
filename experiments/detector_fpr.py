"""Realized test FPR of detectors against their target (threat_model.fpr).

    python experiments/detector_fpr.py RUN [--preset default] [--validation-samples N]
    python experiments/detector_fpr.py RUN --checkpoints

For every detector trial of ``RUN`` (its defense and hyperparameters, from ``RUN/records``),
train it again as the sweep does under the preset's spec (optionally with another
``validation_samples``), or with ``--checkpoints`` restore the trial's own checkpoint (base
models from the run, as the final evaluation does), then count the clean test images it
rejects: every test image of the dataset, with the 95 % Wilson interval. One line per trial.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from defenses.core import data as data_lib  # noqa: E402
from defenses.attacks import frozen_eval  # noqa: E402
from defenses.core.base import predict_labels  # noqa: E402
from orchestrator.cli import add_device_options, parse_with_device  # noqa: E402
from orchestrator.evaluate import load_spec_file, local_checkpoint, restore  # noqa: E402
from orchestrator.records import load_records  # noqa: E402
from orchestrator.spec import load, parse  # noqa: E402
from orchestrator.stats import wilson_interval  # noqa: E402
from orchestrator.training import build_setup, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--preset", default="default")
    p.add_argument("--validation-samples", type=int, default=None)
    p.add_argument("--checkpoints", action="store_true",
                   help="measure the run's own trials (their checkpoints) instead of retraining")
    add_device_options(p, threads=2)
    args, device = parse_with_device(p)
    raw = load(preset=args.preset).model_dump()
    if args.validation_samples is not None:
        raw["validation_samples"] = args.validation_samples
    spec = parse(raw)
    work = Path(tempfile.mkdtemp(prefix="fpr-"))
    for rec in sorted(load_records(args.run), key=lambda r: (r.defense, r.trial_id)):
        if "fpr" not in rec.metrics:
            continue
        if args.checkpoints:
            spec = load_spec_file(args.run / "spec.json")
            s = restore(local_checkpoint(rec.checkpoint), spec, args.run, device)
        else:
            s = build_setup(spec, rec.defense, rec.hp, device, work)
            train(s, spec.epochs)
        x = data_lib.as_float(s.data.test_x, s.device)
        with frozen_eval(s.defense.model):
            _, rejected = predict_labels(s.defense, x, 500)
        k, n = int(rejected.sum()), len(rejected)
        low, high = wilson_interval(k, n)
        target = s.defense.target_fpr
        print(f"{rec.trial_id} {rec.defense:18s} {json.dumps(rec.hp, sort_keys=True)}: "
              f"validation {spec.validation_samples}, target {100 * target:.1f} %, realized "
              f"{100 * k / n:.1f} % [{100 * low:.1f}, {100 * high:.1f}] ({k}/{n}), "
              f"off by {100 * (k / n - target):+.1f} pts", flush=True)


if __name__ == "__main__":
    main()
