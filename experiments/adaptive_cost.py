"""What the detectors' new adaptive attacks cost a trial's evaluation, and what they break.

At the threat model's ε (0.3) on the first N mnist5k test images, for each detector at its
default-preset settings (feature squeezing 1-bit + 2×2 median, Grad-CAM θ = 0.1, the saliency
detector's JSD on FGSM), guarding a small_cnn trained like a default-preset base (3 epochs on
2,000 images, batch 100, Adam 1e-3): the cascade of the previous adaptive set (the spec's FGSM
and PGD-20, the paper's alternating attack for the saliency detector, extra-class C&W and
orthogonal PGD with one run each), then, on its survivors and each timed alone, what the new
set adds: the second runs of C&W and orthogonal PGD from random starts, jsd's
``bpda_softplus`` attack and ``square_joint``. The gradient-masking checks' own Square-100 (on
≤ 64 survivors), which the new cascade makes redundant, is subtracted. The robustness curve's
other ε are unchanged (``GuardDetector.full_strength``). CPU seconds of one thread; on a shared
machine they grow with its load, which is printed with each line.

    python experiments/adaptive_cost.py [--samples 500] [--run-dir runs/adaptive_cost]
                                        [--detectors feature_squeezing,gradcam_detector,saliency_detector]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from defenses.core import data as data_lib  # noqa: E402
from defenses.core import models, registry  # noqa: E402
from defenses.attacks import make  # noqa: E402
from defenses.attacks.base import frozen_eval  # noqa: E402
from defenses.attacks.detector_aware import ExtraClassCW, OrthogonalPGD  # noqa: E402
from defenses.attacks.pgd import random_start  # noqa: E402
from defenses.core.base import ThreatModel, predict_labels  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, complain, device_of  # noqa: E402

log = logging.getLogger("adaptive_cost")
EPS = 0.3
HP = {"feature_squeezing": {"bit_depth": 1, "median_size": 2}, "gradcam_detector": {"theta": 0.1},
      "saliency_detector": {"detector": "jsd", "train_attack": "fgsm"}}
META = {"dataset": "mnist5k", "model": "small_cnn", "defense": "standard", "num_classes": 10,
        "in_channels": 1, "seed": 0, "hp": {}}


def base_checkpoint(ds: data_lib.Dataset, run_dir: Path, device: torch.device) -> Path:
    path = run_dir / "standard.pt"
    if not path.is_file():
        torch.manual_seed(0)
        net = models.build("small_cnn", 10, 1).to(device)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for epoch in range(3):
            gen = torch.Generator().manual_seed(epoch)
            for x, y in data_lib.batches(ds.train_x, ds.train_y, 100, shuffle=True, generator=gen,
                                           device=device):
                net.train()
                opt.zero_grad()
                F.cross_entropy(net(data_lib.as_float(x)), y).backward()
                opt.step()
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "meta": META}, path)
    return path


class SecondRun:
    """One more run of a detector-aware attack from a uniform random start (what its
    ``restarts=2`` adds on the points the first run left)."""

    def __init__(self, attack):
        self.attack, self.name = attack, f"{attack.name} 2nd run"
        self.run = attack._search if isinstance(attack, ExtraClassCW) else attack._run

    def __call__(self, images, labels):
        with frozen_eval(self.attack.model):
            adv = self.run(images, labels, images + random_start(images, EPS))
        return torch.min(torch.max(adv.detach(), images - EPS), images + EPS).clamp(0.0, 1.0)


def measure(name: str, ds: data_lib.Dataset, ckpt: Path, x: torch.Tensor, y: torch.Tensor) -> dict:
    cls = registry.get(name)
    net = models.build("small_cnn", 10, 1).to(x.device)
    d = cls(net, cls.make_params(HP[name]), ThreatModel(EPS))
    d.setup(ds, ckpt)
    for epoch in range(1, 4):
        d.train_epoch(data_lib.batches(ds.train_x, ds.train_y, 100, shuffle=False, device=x.device),
                      None, epoch)
        d.end_epoch(epoch, None)
        if d.stop_training:
            break
    torch.manual_seed(0)
    pred, rej = predict_labels(d, x, 256)
    robust = (pred == y) & ~rej

    def run(attack) -> float:
        idx = robust.nonzero().squeeze(1)
        start = time.process_time()
        broken = 0
        for i in range(0, len(idx), 256):
            j = idx[i:i + 256]
            p, r = predict_labels(d, attack(x[j], y[j]), 256)
            fooled = (p != y[j]) & ~r
            robust[j[fooled]] = False
            broken += int(fooled.sum())
        cpu = time.process_time() - start
        print(f"  {attack.name:26s} on {len(idx):4d} points: broke {broken:3d}, {cpu:6.1f} s cpu "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        return cpu

    print(name, flush=True)
    k, joint = d.adaptive_budget(), d.joint()
    old = [make("fgsm", d.model, EPS), make("pgd-20", d.model, EPS)]
    if name == "saliency_detector":
        old.append(d.whitebox_attack(EPS))
    single = [ExtraClassCW(joint, EPS, steps=max(k // 2, 1), search_steps=2, early_stop=True),
              OrthogonalPGD(joint, EPS, steps=k, early_stop=True)]
    before = sum(run(a) for a in old + single)
    robust_before = robust.float().mean().item()
    added = sum(run(SecondRun(a)) for a in single)
    added += sum(run(a) for a in d.adaptive_attacks(EPS) if a.name.startswith(("bpda", "square")))
    survivors = robust.nonzero().squeeze(1)[:64]
    start = time.process_time()
    if len(survivors):
        d.blackbox_attack(EPS, 100)(x[survivors], y[survivors])
    saved = time.process_time() - start
    out = {"old_cascade_s": before, "added_s": added, "masking_square_saved_s": saved,
           "net_added_s": added - saved, "robust_before": robust_before,
           "robust_after": robust.float().mean().item()}
    print(f"  old cascade {before:.1f} s; added {added:.1f} s − masking Square {saved:.1f} s = "
          f"{added - saved:+.1f} s; robust {robust_before:.3f} -> {out['robust_after']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "adaptive_cost")
    ap.add_argument("--detectors", default=",".join(HP))
    add_device_options(ap, threads=1)
    args = ap.parse_args()
    try:
        device = device_of(args)
    except BadInput as e:
        sys.exit(complain(ap.prog, str(e)))
    logging.basicConfig(level=logging.WARNING)
    mnist = data_lib.hold_out_validation(data_lib.load("mnist5k"), 256)
    ds = dataclasses.replace(mnist, train_x=mnist.train_x[:2000], train_y=mnist.train_y[:2000])
    ckpt = base_checkpoint(ds, args.run_dir, device)
    ds = ds.to(device)
    x, y = data_lib.as_float(mnist.test_x[:args.samples], device), mnist.test_y[:args.samples].to(device)
    for name in args.detectors.split(","):
        measure(name.strip(), ds, ckpt, x, y)


if __name__ == "__main__":
    main()
