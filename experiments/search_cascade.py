"""Which search-time cascade tells the truth on the short trials a sweep is made of?

Trains the adversarially trained defenses of the default preset as the sweep does (mnist5k,
small_cnn, 3 epochs on 2,000 images, PGD-5 training attack, each defense's search-space
defaults), then evaluates the first N test images at ε = 0.3 with each candidate cascade
(no adaptive attacks, to compare the lists alone) and, independently of the project's cascade
code, with the reference AutoAttack (Croce & Hein 2020, packaged on PyPI as ``pyautoattack``:
``pip install pyautoattack``), version "standard", called on the defense's predictor.
Prints robust accuracy, the gap to AutoAttack and the seconds of every cascade.

    python experiments/search_cascade.py [--samples 500] [--defenses pgd_at,trades,...]
                                         [--run-dir runs/search_cascade]
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

import torch  # noqa: E402

from defenses.core import data as data_lib  # noqa: E402
from defenses.attacks import frozen_eval  # noqa: E402
from defenses.core.base import predict_labels  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, device_of  # noqa: E402
from orchestrator.spec import PRESETS, build_space, parse  # noqa: E402
from orchestrator.training import build_setup, train  # noqa: E402

CANDIDATES = {
    "fgsm+pgd-20 (before)": ["fgsm", "pgd-20"],
    "fgsm+apgd_ce-20": ["fgsm", "apgd_ce-20"],
    "fgsm+apgd_ce-20+apgd_t-20x3": ["fgsm", "apgd_ce-20", "apgd_t-20x3"],
    "fgsm+apgd_ce-20+apgd_dlr-20": ["fgsm", "apgd_ce-20", "apgd_dlr-20"],
    "fgsm+apgd_ce-10+apgd_t-10x3": ["fgsm", "apgd_ce-10", "apgd_t-10x3"],
    "fgsm+apgd_ce-20+apgd_t-10x3": ["fgsm", "apgd_ce-20", "apgd_t-10x3"],
    "fgsm+apgd_ce-20+apgd_t-10x2": ["fgsm", "apgd_ce-20", "apgd_t-10x2"],
    "apgd_ce-50+apgd_t-50x3": ["apgd_ce-50", "apgd_t-50x3"],
    "fgsm+apgd_ce-30+apgd_t-30x3": ["fgsm", "apgd_ce-30", "apgd_t-30x3"],
    "fgsm+apgd_ce-50+apgd_t-50x3": ["fgsm", "apgd_ce-50", "apgd_t-50x3"],
    "fgsm+apgd_ce-50+apgd_t-50x1": ["fgsm", "apgd_ce-50", "apgd_t-50x1"],
    "reduced (AutoAttack's four at CPU budgets)": ["reduced"],
    "apgd_ce-50+apgd_t-50x9": ["apgd_ce-50", "apgd_t-50x9"],
}


def defaults(spec, defense: str) -> dict:
    """The first value of every choice and the middle of every range of the defense's space."""
    from ray.tune.search.sample import Categorical, Float

    hp = {}
    for k, dom in build_space(spec, defense).items():
        if isinstance(dom, Categorical):
            hp[k] = dom.categories[0]
        elif isinstance(dom, Float):
            hp[k] = (dom.lower * dom.upper) ** 0.5 if dom.lower > 0 else (dom.lower + dom.upper) / 2
        else:
            hp[k] = dom
    return hp


def autoattack_acc(defense, x, y, eps: float, components: list[str] | None = None) -> tuple[float, float]:
    """Robust accuracy under the reference AutoAttack standard (or some of its components at
    standard's budgets), judged by ``predict``."""
    from pyautoattack import AutoAttack

    t0 = time.perf_counter()
    aa = AutoAttack(defense.predictor(), norm="Linf", eps=eps, version="standard", seed=0)
    if components:
        aa.attacks_to_run = components
    aa.verbose = True  # its log: robust accuracy and seconds after each component
    with frozen_eval(defense.model):  # eval mode, as every evaluation of the project
        adv, _ = aa.run_standard_evaluation(x, y, batch_size=250)
        pred, rej = predict_labels(defense, adv, 250)
        clean_pred, clean_rej = predict_labels(defense, x, 250)
    ok = (clean_pred == y) & ~clean_rej & ((pred == y) | rej)
    return ok.float().mean().item(), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--defenses", default="pgd_at,trades,fgsm_rs,sat,atat")
    p.add_argument("--cascades", default=None,
                   help="comma-separated labels of CANDIDATES to run (default: all)")
    p.add_argument("--run-dir", default="runs/search_cascade")
    p.add_argument("--aa", default="standard",
                   help="'standard', or comma-separated components of it at its budgets, e.g. "
                        "apgd-ce,apgd-t (FAB-T runs for many minutes per model on one CPU core)")
    add_device_options(p, threads=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # per-attack accuracy and seconds
    try:
        device = device_of(args)
    except BadInput as e:
        p.error(str(e))
    raw = dict(PRESETS["default"])
    raw["defenses"] = args.defenses.split(",")
    spec = parse(raw)
    run_dir = Path(args.run_dir)
    out: dict = {}
    for name in spec.defenses:
        hp = defaults(spec, name)
        s = build_setup(spec, name, hp, device, run_dir)
        weights = run_dir / f"{name}.pt"
        if weights.is_file():
            s.defense.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["defense"])
            s.defense.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
        else:
            train(s, spec.epochs)
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": s.defense.model.state_dict(), "defense": s.defense.state_dict()}, weights)
        x = data_lib.as_float(s.data.test_x[:args.samples], device)
        y = s.data.test_y[:args.samples].to(device)
        row: dict = {"hp": hp}
        kept = run_dir / f"{name}-aa-{args.aa}-{args.samples}.json"  # AutoAttack is the slow part
        if kept.is_file():
            aa, aa_s = json.loads(kept.read_text())
        else:
            aa, aa_s = autoattack_acc(s.defense, x, y, spec.threat_model.eps,
                                      None if args.aa == "standard" else args.aa.split(","))
            kept.write_text(json.dumps([aa, aa_s]))
        row["autoattack"] = {"components": args.aa, "robust": aa, "seconds": round(aa_s, 1)}
        print(f"{name:10s} reference AutoAttack ({args.aa}): robust {aa:.1%} in {aa_s:.0f} s", flush=True)
        chosen = args.cascades.split(",") if args.cascades else list(CANDIDATES)
        for label, attacks in ((k, CANDIDATES[k]) for k in chosen):
            torch.manual_seed(0)
            r = benchmark(s.defense, x, y, spec.threat_model.eps, attacks, adaptive=False)
            row[label] = {"clean": r.clean_acc, "robust": r.robust_acc, "gap": r.robust_acc - aa,
                          "seconds": round(r.seconds, 1)}
            print(f"{name:10s} {label:32s} clean {r.clean_acc:.1%} robust {r.robust_acc:.1%} "
                  f"(AA {aa:.1%}, gap {100 * (r.robust_acc - aa):+.1f} pts) {r.seconds:.1f} s", flush=True)
        out[name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
