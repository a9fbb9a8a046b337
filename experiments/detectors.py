"""Grad-CAM inconsistency detector (paper 002) and feature squeezing on mnist5k / small_cnn.

1. θ sweep of ``gradcam_detector`` with the paper's label-comparison rule (θ = 0.0 … 0.5,
   enhancement none / zero mean; colour
   reversing is the identity on 1-channel MNIST and is refused there): OSPA, FPR, detection
   rate and AUROC for FGSM, C&W-L2 (the paper's two attacks) and PGD-20, crafted on the
   classifier alone (the paper's detector-unaware setting) and shared by every setting.
2. ``feature_squeezing`` (Xu et al.) in the spirit of paper 002's Table IV: each squeezer
   alone and Xu's MNIST pair (1-bit + 2×2 median), threshold at 5 % FPR on the clean
   validation split (images the classifier never trained on); the same metrics, plus the FPR
   measured on the held-out test images.
3. Both detectors under the detector-aware attacks (extra-class C&W, orthogonal and selective
   PGD) next to the non-adaptive ones, on fewer images: detection rate, evasion rate and robust
   accuracy (adversarial counts as defended if rejected or correct; a rejected clean input is
   an error), and the worst case over all attacks. Then ``benchmark`` exactly as a sweep trial
   runs it (FGSM, PGD-20, then the defense's own adaptive attacks at budget 20).

Base classifier and detectors are built by the orchestrator's own trial code (``build_setup``,
``train``), so they are what a sweep would evaluate. Results go to ``OUT/results.json`` and, as
markdown, into ``docs/detectors.md`` between the ``results`` markers (the hand-written text
around them is kept). Adversarial sets are cached in OUT, so a rerun only computes what is
missing.

    nice -n 10 python experiments/detectors.py --out /tmp/detectors_exp

``--fpr-check`` only measures, for each detector at its defaults (feature squeezing 1-bit + 2×2
median, Grad-CAM margin rule θ = 0.1, saliency detector SPD on FGSM) built as a default-preset
trial builds it, the realized FPR on all 1,000 test images at the 5 % target, next to what the
same detector gives when its threshold is set on the classifier's own training images (the
calibration before the validation split):

    nice -n 10 python experiments/detectors.py --fpr-check --out /tmp/detectors_fpr
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defenses import attacks as attack_lib  # noqa: E402
from defenses.core import data as data_lib  # noqa: E402
from defenses.core.cache import atomic_write  # noqa: E402
from defenses.attacks.detector_aware import ExtraClassCW, OrthogonalPGD  # noqa: E402
from defenses.evaluation.detection import DetectorReport, craft, detection_report  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, complain, device_of  # noqa: E402

EPS = 0.3
SPEC = {"dataset": "mnist5k", "model": "small_cnn", "epochs": 3, "train_samples": 2000,
        "eval_samples": 500, "batch_size": 100,
        "threat_model": {"eps": EPS, "attacks": ["fgsm", "pgd-20"], "train_steps": 5},
        "defenses": ["gradcam_detector", "feature_squeezing"]}
THETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
ENHANCEMENTS = ("none", "zero_mean")
SQUEEZERS = [  # (label, hyperparameters): paper 002 Table IV's kinds, Xu et al.'s MNIST pair
    ("1-bit", {"bit_depth": 1, "median_size": 0}),
    ("2-bit", {"bit_depth": 2, "median_size": 0}),
    ("3-bit", {"bit_depth": 3, "median_size": 0}),
    ("4-bit", {"bit_depth": 4, "median_size": 0}),
    ("5-bit", {"bit_depth": 5, "median_size": 0}),
    ("median 2×2", {"bit_depth": 0, "median_size": 2}),
    ("median 3×3", {"bit_depth": 0, "median_size": 3}),
    ("NLM 11-3-4", {"bit_depth": 0, "median_size": 0, "nlm_search": 11, "nlm_patch": 3, "nlm_h": 4.0}),
    ("1-bit + median 2×2 (Xu MNIST)", {"bit_depth": 1, "median_size": 2}),
]
ADAPTIVE_CONFIGS = [  # (defense, label, hyperparameters)
    ("gradcam_detector", "Grad-CAM θ=0.1", {"theta": 0.1, "enhancement": "none", "rule": "paper"}),
    ("gradcam_detector", "Grad-CAM θ=0.3", {"theta": 0.3, "enhancement": "none", "rule": "paper"}),
    ("gradcam_detector", "Grad-CAM θ=0.5", {"theta": 0.5, "enhancement": "none", "rule": "paper"}),
    ("gradcam_detector", "Grad-CAM θ=0.1 + zero mean",
     {"theta": 0.1, "enhancement": "zero_mean", "rule": "paper"}),
    ("gradcam_detector", "Grad-CAM θ=0.3, margin threshold at 5 % FPR",
     {"theta": 0.3, "enhancement": "none", "rule": "margin"}),
    ("feature_squeezing", "FS 1-bit + median 2×2", {"bit_depth": 1, "median_size": 2}),
]
CW_STEPS, CW_SEARCH = 30, 3     # C&W-L2: Adam steps per constant, rounds of the search on c
ADAPTIVE_STEPS = 50             # orthogonal / selective PGD steps
PLAIN = ("fgsm", "cw_l2-30x3", "pgd-20")
NAMES = {"fgsm": "FGSM", "cw_l2-30x3": "C&W-L2", "pgd-20": "PGD-20"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def num(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def build(name: str, hp: dict, run_dir: Path, device: torch.device):
    """A detector exactly as a trial builds it: base classifier, setup, one (calibrating)
    epoch; returns (defense, held-out metrics of end_epoch)."""
    from orchestrator.spec import parse
    from orchestrator.training import build_setup, train

    spec = parse(SPEC)
    s = build_setup(spec, name, hp, device, run_dir)
    metrics = {}
    train(s, spec.epochs, on_epoch=lambda epoch, m, sec: metrics.update(m))
    return s.defense, metrics


def cached(path: Path, make, device: torch.device):
    if path.is_file():
        return torch.load(path, map_location=device, weights_only=True)
    value = make()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def plain_attacks(model, x, y, out: Path) -> dict[str, torch.Tensor]:
    """FGSM, the paper's C&W-L2 (in the ε-box) and PGD-20 on the classifier alone."""
    attacks = [attack_lib.make("fgsm", model, EPS),
               ExtraClassCW(model, EPS, steps=CW_STEPS, search_steps=CW_SEARCH, extra_class=False),
               attack_lib.make("pgd-20", model, EPS)]
    advs = {}
    for attack in attacks:
        torch.manual_seed(0)
        advs[attack.name] = cached(out / f"adv-{attack.name}-{len(y)}.pt",
                                   lambda: craft([attack], x, y)[attack.name], x.device)
        log(f"crafted {attack.name} on {len(y)} images")
    return advs


def report_row(r: DetectorReport, names=PLAIN) -> dict:
    return {"ospa": r.ospa, "fpr": r.fpr, "classifier_acc": r.classifier_acc,
            **{f"det.{a}": r.attacks[a].detection_rate for a in names},
            **{f"auroc.{a}": r.attacks[a].auroc for a in names},
            **{f"tpr5.{a}": r.attacks[a].tpr_at_fpr for a in names},
            **{f"fooled.{a}": r.attacks[a].fooled for a in names},
            **{f"robust.{a}": r.attacks[a].robust_acc for a in names}}


def theta_sweep(x, y, advs, run_dir: Path) -> list[dict]:
    rows = []
    for enh in ENHANCEMENTS:
        for theta in THETAS:
            defense, _ = build("gradcam_detector", {"theta": theta, "enhancement": enh, "rule": "paper"},
                               run_dir, x.device)
            r = detection_report(defense, x, y, advs)
            rows.append({"theta": theta, "enhancement": enh, **report_row(r)})
            log(f"θ={theta} {enh}: OSPA {r.ospa:.3f}, FPR {r.fpr:.3f}, detection "
                + ", ".join(f"{a} {r.attacks[a].detection_rate:.3f}" for a in PLAIN))
    return rows


def squeezing(x, y, advs, run_dir: Path) -> list[dict]:
    rows = []
    for label, hp in SQUEEZERS:
        defense, held = build("feature_squeezing", hp, run_dir, x.device)  # at the threat model's 5 %
        r = detection_report(defense, x, y, advs)
        rows.append({"squeezer": label, "threshold": defense.threshold,
                     "holdout_fpr": held.get("holdout.clean_fpr"), **report_row(r)})
        log(f"{label}: τ {defense.threshold:.4f}, OSPA {r.ospa:.3f}, FPR {r.fpr:.3f}")
    return rows


def adaptive(x, y, advs, run_dir: Path, out: Path) -> list[dict]:
    rows = []
    for name, label, hp in ADAPTIVE_CONFIGS:
        defense, _ = build(name, hp, run_dir, x.device)
        joint = defense.joint()
        attacks = [ExtraClassCW(joint, EPS, steps=CW_STEPS, search_steps=CW_SEARCH, early_stop=True),
                   OrthogonalPGD(joint, EPS, steps=ADAPTIVE_STEPS, early_stop=True),
                   OrthogonalPGD(joint, EPS, steps=ADAPTIVE_STEPS, variant="selective", early_stop=True)]
        sets = dict(advs)
        key = "-".join(f"{k}{v}" for k, v in sorted(hp.items()))
        t0 = time.process_time()
        for attack in attacks:
            sets[attack.name] = cached(out / f"adv-{name}-{key}-{attack.name}-{len(y)}.pt",
                                       lambda: craft([attack], x, y)[attack.name], x.device)
        seconds = time.process_time() - t0
        r = detection_report(defense, x, y, sets)
        names = list(sets)
        row = {"defense": name, "label": label, "hp": hp, "ospa": r.ospa, "fpr": r.fpr,
               "adaptive_cpu_seconds": seconds,
               "attacks": {a: {"fooled": r.attacks[a].fooled, "attacked": r.attacks[a].attacked,
                               "detection_rate": r.attacks[a].detection_rate,
                               "evasion_rate": r.attacks[a].evasion_rate,
                               "robust_acc": r.attacks[a].robust_acc, "auroc": r.attacks[a].auroc,
                               "tpr5": r.attacks[a].tpr_at_fpr} for a in names},
               "worst_plain": r.worst_case_robust_acc(PLAIN),
               "worst_all": r.worst_case_robust_acc(names)}
        torch.manual_seed(0)
        t0 = time.process_time()
        bench = benchmark(defense, x, y, EPS, list(SPEC["threat_model"]["attacks"]))
        row["benchmark"] = {"clean_acc": bench.clean_acc, "robust_acc": bench.robust_acc,
                            "acc": bench.acc, "cpu_seconds": time.process_time() - t0}
        rows.append(row)
        log(f"{label}: worst case plain {row['worst_plain']:.3f}, all {row['worst_all']:.3f}; "
            f"benchmark {bench.acc}")
    return rows


FPR_CONFIGS = [  # (defense, label, hyperparameters): each detector at its defaults
    ("feature_squeezing", "feature squeezing 1-bit + median 2×2", {}),
    ("gradcam_detector", "Grad-CAM margin rule θ=0.1", {}),
    ("saliency_detector", "saliency detector SPD, FGSM-trained", {}),
    # the kinds whose test FPR ran furthest from the target with training-image thresholds
    ("saliency_detector", "saliency detector JSD, FGSM-trained", {"detector": "jsd"}),
    ("saliency_detector", "saliency detector SMD, FGSM-trained", {"detector": "smd"}),
]


def rejected_share(defense, x: torch.Tensor, batch: int = 250) -> float:
    with torch.no_grad():
        return torch.cat([defense.predict(x[i:i + batch]).rejected
                          for i in range(0, len(x), batch)]).float().mean().item()


def fpr_check(run_dir: Path, device: torch.device, validation_samples: int | None = None) -> list[dict]:
    """Realized FPR on all test images at the threat model's 5 %, per detector, as a trial
    builds it (threshold on the validation split); and, for contrast, with the threshold set
    on 300 of the classifier's training images, the calibration before the split."""
    from orchestrator.spec import parse
    from orchestrator.training import build_setup, train

    raw = SPEC if validation_samples is None else {**SPEC, "validation_samples": validation_samples}
    spec = parse(raw)
    full = data_lib.hold_out_validation(data_lib.load("mnist5k", seed=spec.seed), spec.validation_samples)
    test = full.test_x.to(device)
    # training images past train_samples: unseen by the classifier and the detector too, a
    # second sample of the same distribution to tell the threshold's sampling error from a bias
    spare = full.train_x[spec.train_samples:].to(device)
    rows = []
    for name, label, hp in FPR_CONFIGS:
        t0 = time.process_time()
        s = build_setup(spec, name, hp, device, run_dir)
        train(s, spec.epochs)
        d = s.defense
        val = d.calib_x if name == "saliency_detector" else d.val_x  # the validation split
        row = {"defense": name, "label": label, "target": d.target_fpr, "n_val": s.data.n_val,
               "n_test": len(test), "threshold": d.threshold, "val_fpr": rejected_share(d, val),
               "test_fpr": rejected_share(d, test), "n_spare": len(spare),
               "spare_fpr": rejected_share(d, spare)}
        train_x = data_lib.as_float(s.data.train_x[-300:], device)
        if name == "saliency_detector":
            calib = d.calib_x
            d.calib_x = train_x  # (images this detector also trained on, unlike before the split)
            d.calibrate()
            d.calib_x = calib
        else:
            d.calibrate(train_x)
        row["test_fpr_train_calibrated"] = rejected_share(d, test)
        row["cpu_seconds"] = time.process_time() - t0
        rows.append(row)
        log(f"{label}: target {row['target']:.3f}, test FPR {row['test_fpr']:.3f} "
            f"(validation {row['val_fpr']:.3f}, {len(spare)} unused training images "
            f"{row['spare_fpr']:.3f}; calibrated on training images "
            f"{row['test_fpr_train_calibrated']:.3f}), {row['cpu_seconds']:.0f} CPU s")
    return rows


# --- markdown -------------------------------------------------------------------------------

def theta_table(rows: list[dict]) -> str:
    head = ("| enhancement | θ | OSPA | FPR | det. FGSM | det. C&W-L2 | det. PGD-20 | AUROC FGSM "
            "| AUROC C&W-L2 | AUROC PGD-20 | TPR@5% FGSM | TPR@5% C&W-L2 |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['enhancement']} | {r['theta']:.1f} | {pct(r['ospa'])} | {pct(r['fpr'])} | "
                     + " | ".join(pct(r[f"det.{a}"]) for a in PLAIN) + " | "
                     + " | ".join(num(r[f"auroc.{a}"]) for a in PLAIN) + " | "
                     + " | ".join(pct(r[f"tpr5.{a}"]) for a in ("fgsm", "cw_l2-30x3")) + " |")
    return "\n".join(lines)


def squeeze_table(rows: list[dict]) -> str:
    head = ("| squeezer | threshold | OSPA | FPR test | FPR held-out train | det. FGSM | det. C&W-L2 "
            "| det. PGD-20 | AUROC FGSM | AUROC C&W-L2 | AUROC PGD-20 |\n|" + "---|" * 11)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['squeezer']} | {r['threshold']:.4f} | {pct(r['ospa'])} | {pct(r['fpr'])} | "
                     f"{pct(r['holdout_fpr'])} | " + " | ".join(pct(r[f"det.{a}"]) for a in PLAIN) + " | "
                     + " | ".join(num(r[f"auroc.{a}"]) for a in PLAIN) + " |")
    return "\n".join(lines)


def adaptive_tables(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append(f"**{r['label']}** — OSPA {pct(r['ospa'])} %, FPR {pct(r['fpr'])} %; robust accuracy "
                   f"worst case over the non-adaptive attacks {pct(r['worst_plain'])} %, over all "
                   f"attacks {pct(r['worst_all'])} % (adaptive attacks: "
                   f"{r['adaptive_cpu_seconds']:.0f} CPU s)\n")
        out.append("| attack | kind | fooled / attacked | detection rate | evasion rate | robust acc. "
                   "| AUROC | TPR@5% |\n|---|---|---|---|---|---|---|---|")
        for a, m in r["attacks"].items():
            kind = "classifier only" if a in PLAIN else "detector-aware"
            out.append(f"| {NAMES.get(a, a)} (`{a}`) | {kind} | {m['fooled']} / {m['attacked']} | "
                       f"{pct(m['detection_rate'])} | {pct(m['evasion_rate'])} | {pct(m['robust_acc'])} | "
                       f"{num(m['auroc'])} | {pct(m['tpr5'])} |")
        out.append("")
    out.append("Sweep-equivalent `benchmark` (cascade: FGSM, PGD-20, then the defense's own "
               "`adaptive_attacks` at budget 20), same images:\n")
    out.append("| detector | clean acc. (OSPA) | after FGSM | after PGD-20 | after C&W extra-class "
               "| after orthogonal PGD | robust acc. | CPU s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["benchmark"]
        accs = list(b["acc"].values())
        out.append(f"| {r['label']} | {pct(b['clean_acc'])} | " + " | ".join(pct(v) for v in accs)
                   + f" | {pct(b['robust_acc'])} | {b['cpu_seconds']:.0f} |")
    return "\n".join(out)


def write_docs(results: dict, path: Path) -> None:
    s = results["settings"]
    body = (f"<!-- results:start -->\n_Generated by `experiments/detectors.py` "
            f"({s['date']}, {s['cpu_minutes']:.1f} CPU min): {s['n_eval']} test images for the "
            f"θ sweep and squeezers, {s['n_adaptive']} for the adaptive attacks; ε = {EPS} (L∞); "
            f"classifier {s['classifier']}._\n\n"
            f"### Grad-CAM detector: θ sweep (attacks on the classifier alone)\n\n"
            f"{theta_table(results['theta_sweep'])}\n\n"
            f"### Feature squeezing (threshold at 5 % FPR on the clean validation split)\n\n"
            f"{squeeze_table(results['squeezing'])}\n\n"
            f"### Under detector-aware attacks\n\n{adaptive_tables(results['adaptive'])}\n"
            f"<!-- results:end -->")
    text = path.read_text() if path.is_file() else "<!-- results:start -->\n<!-- results:end -->\n"
    start, end = text.index("<!-- results:start -->"), text.index("<!-- results:end -->")
    path.write_text(text[:start] + body + text[end + len("<!-- results:end -->"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/detectors_exp"))
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--n-adaptive", type=int, default=200)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "detectors.md")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="where the base classifier is cached (default OUT/run)")
    ap.add_argument("--fpr-check", action="store_true",
                    help="only measure each detector's realized test FPR at the 5 %% target")
    ap.add_argument("--validation-samples", type=int, default=None,
                    help="with --fpr-check: the spec's validation_samples (default: the spec default)")
    add_device_options(ap, threads=1)
    args = ap.parse_args()
    try:
        device = device_of(args)
    except BadInput as e:
        sys.exit(complain(ap.prog, str(e)))
    args.out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    run_dir = args.run_dir or args.out / "run"
    if args.fpr_check:
        rows = fpr_check(run_dir, device, args.validation_samples)
        (args.out / "fpr_check.json").write_text(json.dumps(rows, indent=1, default=float))
        log(f"done in {(time.process_time() - cpu0) / 60:.1f} CPU min; wrote {args.out / 'fpr_check.json'}")
        return

    data = data_lib.load("mnist5k")
    x, y = data.test_x[:args.n_eval].to(device), data.test_y[:args.n_eval].to(device)
    classifier, _ = build("gradcam_detector", {"theta": 0.0, "rule": "paper"}, run_dir, device)  # loads the base
    advs = plain_attacks(classifier.model, x, y, args.out)
    results = {"theta_sweep": theta_sweep(x, y, advs, run_dir),
               "squeezing": squeezing(x, y, advs, run_dir)}
    n = args.n_adaptive
    results["adaptive"] = adaptive(x[:n], y[:n], {k: v[:n] for k, v in advs.items()}, run_dir, args.out)
    results["settings"] = {"date": time.strftime("%Y-%m-%d"), "n_eval": args.n_eval, "n_adaptive": n,
                           "spec": SPEC, "cpu_minutes": (time.process_time() - cpu0) / 60,
                           "classifier": "small_cnn, standard training, 3 epochs on 2000 mnist5k "
                                         "images (the sweep's base model)"}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    write_docs(results, args.docs)
    log(f"done in {results['settings']['cpu_minutes']:.1f} CPU min; wrote {args.docs}")


if __name__ == "__main__":
    main()
