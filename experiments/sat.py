"""SAT on mnist5k/small_cnn: a Fig.-5-style sweep of α and ε₀, and SAT vs PGD-AT vs
PGD-SAT (and TRADES vs TRADES-SAT) at equal epochs, with the training cost of each.

    nice -n 10 python experiments/sat.py [--epochs 5] [--train 2000] [--eval 300] \\
        [--square 100] [--methods] [--run-dir /tmp/sat_exp] [--out docs/sat.md]

Every model is trained by ``run_trial`` (the sweep's own loop; teachers are the orchestrator's
cached base models) and evaluated here on the first ``--eval`` test images at L∞ ε = 0.1 and
0.3 by the cascade fgsm → pgd-40 → pgd_cw-30 (``defenses.evaluation.benchmark.benchmark``), plus
square-1000 on the first ``--square`` images at ε = 0.3 for the comparison table. Results are
kept in RUN_DIR/results.json, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from defenses.core import data as data_lib  # noqa: E402
from defenses.core import models as model_lib  # noqa: E402
from defenses.core import registry  # noqa: E402
from defenses.core.base import BaseModelRequest  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from orchestrator.cli import add_device_options, parse_with_device, trial_resources  # noqa: E402
from orchestrator.training import ensure_base  # noqa: E402
from orchestrator.spec import parse  # noqa: E402
from orchestrator.trial import LocalReporter, run_trial  # noqa: E402
from orchestrator.training import CHECKPOINT_FILE  # noqa: E402

ATTACKS = ["fgsm", "pgd-40", "pgd_cw-30"]
EVAL_EPS = (0.1, 0.3)
PAPER_ALPHA = 0.6 ** 0.1
CENTER = {"teacher": "pgd_at", "method": "guided_backprop", "alpha": PAPER_ALPHA, "eps0": 0.3}


ALPHAS = (0.05, 0.5, 0.8, PAPER_ALPHA, 0.999)
EPS0S = (0.1, 0.2, 0.3, 0.4)


def sweep_label(alpha: float, eps0: float) -> str:
    if (alpha, eps0) == (CENTER["alpha"], CENTER["eps0"]):
        return "SAT Adv-GBP"  # the centre is the comparison table's SAT row
    return f"α={alpha:.3g}, ε₀={eps0:g}"


def sweep_rows() -> list[tuple[str, str, dict]]:
    """Fig. 5: α at the centre ε₀, then ε₀ at the centre α (the centre itself once)."""
    points = [(a, CENTER["eps0"]) for a in ALPHAS] + [(CENTER["alpha"], e) for e in EPS0S]
    return [(sweep_label(a, e), "sat", {**CENTER, "alpha": a, "eps0": e}) for a, e in dict.fromkeys(points)]


def comparison_rows() -> list[tuple[str, str, dict | None]]:
    return [("Standard (Std teacher)", "standard", None), ("PGD-AT (Adv teacher)", "pgd_at", None),
            ("SAT Adv-GBP", "sat", CENTER), ("SAT Std-GBP", "sat", {**CENTER, "teacher": "standard"}),
            ("PGD-SAT Adv-GBP", "sat", {**CENTER, "variant": "pgd_sat"}),
            ("TRADES", "trades", {}), ("TRADES-SAT Adv-GBP", "sat", {**CENTER, "variant": "trades_sat"})]


def method_rows() -> list[tuple[str, str, dict]]:
    return [(f"SAT Adv-{m}", "sat", {**CENTER, "method": m})
            for m in ("gradient", "guided_backprop", "smoothgrad", "integrated_gradients", "grad_cam_pp_box")]


def make_spec(args, device: torch.device):
    # run_trial's own evaluation is FGSM only (cheap); the real evaluation is done here, at two ε
    return parse({"name": "sat-exp", "dataset": "mnist5k", "model": "small_cnn", "epochs": args.epochs,
                  "train_samples": args.train, "eval_samples": 50, "batch_size": 100,
                  "optimizer": {"name": "adam", "lr": 1e-3},
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": args.train_steps},
                  "defenses": ["sat", "standard", "pgd_at", "trades"],
                  "resources": trial_resources(device, args.threads)})


def train(spec, run_dir: Path, label: str, defense: str, hp: dict | None, device: torch.device) -> dict:
    """Train one row; base-model rows are the orchestrator's cached teachers themselves."""
    if hp is None:
        path = ensure_base(spec, BaseModelRequest(defense=defense), run_dir, device)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"checkpoint": str(path), "train_seconds": float(state["train_seconds"]),
                "saliency_seconds": 0.0, "hp": {}}
    slug = "".join(c if c.isalnum() else "_" for c in label)
    reporter = LocalReporter(run_dir / "trials" / slug, slug)
    rec = run_trial({"defense": defense, "hp": hp, "spec": spec, "run_dir": str(run_dir)}, reporter)
    if rec.status != "completed":
        raise RuntimeError(f"{label}: {rec.error}")
    return {"checkpoint": str(reporter.checkpoint_dir / CHECKPOINT_FILE), "train_seconds": rec.train_seconds,
            "saliency_seconds": reporter.results[0].get("saliency_seconds", 0.0), "hp": hp}


def evaluate(spec, defense: str, hp: dict, checkpoint: str, x, y, eps: float, attacks: list[str]) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = model_lib.build("small_cnn", 10, 1).to(x.device)
    model.load_state_dict(state["model"])
    cls = registry.get(defense)
    guard = cls(model.eval(), cls.make_params(hp), spec.threat_model.threat_model())
    torch.manual_seed(0)
    r = benchmark(guard, x, y, eps, attacks)
    return {"clean": r.clean_acc, "robust": r.robust_acc, "acc": r.acc, "seconds": r.seconds, "n": r.n}


def run_rows(rows, spec, args, results: dict, store: Path, device: torch.device, square: bool) -> None:
    data = data_lib.load("mnist5k")
    x, y = data_lib.as_float(data.test_x[:args.eval], device), data.test_y[:args.eval].to(device)
    for label, defense, hp in rows:
        if label in results:
            continue
        t0 = time.time()
        row = train(spec, args.run_dir, label, defense, hp, device)
        for eps in EVAL_EPS:
            row[f"eps{eps}"] = evaluate(spec, defense, row["hp"], row["checkpoint"], x, y, eps, ATTACKS)
        if square and args.square:
            row["square"] = evaluate(spec, defense, row["hp"], row["checkpoint"], x[:args.square],
                                     y[:args.square], 0.3, ATTACKS + ["square-1000"])
        row["wall_seconds"] = time.time() - t0
        results[label] = row
        store.write_text(json.dumps(results, indent=1))
        print(f"{label}: clean {row['eps0.1']['clean']:.3f} robust@0.1 {row['eps0.1']['robust']:.3f} "
              f"robust@0.3 {row['eps0.3']['robust']:.3f} train {row['train_seconds']:.0f}s", flush=True)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def cascade(e: dict) -> str:
    return " / ".join(pct(e["acc"][a]) for a in ATTACKS)


def keyed(rows) -> list[tuple[str, str]]:
    return [(label, label) for label, _, _ in rows]


def table(rows: list[tuple[str, str]], results: dict, first: str, square: bool = False) -> str:
    """Markdown rows (shown label, results key)."""
    head = (f"| {first} | clean | ε=0.1: fgsm / +pgd-40 / +pgd_cw-30 | ε=0.3: fgsm / +pgd-40 / +pgd_cw-30 |"
            + (" ε=0.3, first n images: white-box → +square-1000 (n) |" if square else "")
            + " train s | maps s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, key in rows:
        r = results[key]
        cells = [label, pct(r["eps0.1"]["clean"]), cascade(r["eps0.1"]), cascade(r["eps0.3"])]
        if square:
            sq = r.get("square")
            cells.append(f"{pct(sq['acc'][ATTACKS[-1]])} → {pct(sq['robust'])} ({sq['n']})" if sq else "–")
        cells += [f"{r['train_seconds']:.0f}", f"{r['saliency_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--square", type=int, default=100)
    p.add_argument("--methods", action="store_true", help="also compare the saliency methods")
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/sat_exp"))
    p.add_argument("--out", default="docs/sat.md")
    add_device_options(p, threads=1)
    args, device = parse_with_device(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    store = args.run_dir / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    spec = make_spec(args, device)
    run_rows(comparison_rows(), spec, args, results, store, device, square=True)
    run_rows(sweep_rows(), spec, args, results, store, device, square=False)
    if args.methods:
        run_rows(method_rows(), spec, args, results, store, device, square=False)
    sweep = [(f"α = {a:.3g}", sweep_label(a, CENTER["eps0"])) for a in ALPHAS]
    sweep += [(f"ε₀ = {e:g}", sweep_label(CENTER["alpha"], e)) for e in EPS0S]
    text = "\n\n".join([
        "## Comparison at equal epochs\n\n" + table(keyed(comparison_rows()), results, "model", square=True),
        "## α / ε₀ sweep (Adv teacher, Guided Backprop; centre α = 0.6^(1/10) ≈ 0.950, ε₀ = 0.3)\n\n"
        + table(sweep, results, "SAT"),
    ] + (["## Saliency methods (Adv teacher, α = 0.950, ε₀ = 0.3)\n\n" + table(keyed(method_rows()), results, "SAT")]
         if args.methods else []))
    Path(args.out).write_text(document(args, text))
    print(text)


MARKER = "<!-- reading: hand-written below, kept by reruns -->"


def document(args, tables: str) -> str:
    """docs/sat.md: command, settings and tables; a hand-written reading after MARKER is kept."""
    out = Path(args.out)
    kept = out.read_text().split(MARKER, 1)[1] if out.is_file() and MARKER in out.read_text() else "\n"
    command = (f"nice -n 10 python experiments/sat.py --epochs {args.epochs} --train {args.train} "
               f"--eval {args.eval} --train-steps {args.train_steps} --square {args.square}"
               + (" --methods" if args.methods else ""))
    settings = (
        f"mnist5k / small_cnn, the first {args.train} training images, {args.epochs} epochs for every "
        "model (teachers included), Adam lr 1e-3, batch 100, seed 0. PGD-AT, the PGD half of PGD-SAT "
        f"and the TRADES attacks train at ε = 0.3 with {args.train_steps} steps of 2.5ε/K. Teachers are "
        "the orchestrator's base models: Std = `standard`, Adv = `pgd_at` (the PGD-AT row *is* the Adv "
        "teacher: same recipe, same checkpoint). Evaluation: the first "
        f"{args.eval} test images, attack cascade fgsm → pgd-40 → pgd_cw-30 (each number is the robust "
        "accuracy after that attack and all before it; the last is the per-example worst case), at "
        f"ε = 0.1 and ε = 0.3; square-1000 is appended on the first {args.square} images at ε = 0.3. "
        "`train s` is the training time of the model itself (`train_seconds`, CPU, 1 thread, on a "
        "shared machine); `maps s` the one-time saliency computation paid by the first trial of a "
        "(teacher, method) pair (0 = loaded from the cache next to the teacher).")
    return (f"# SAT: saliency-based adversarial training (Mangla et al. 2020)\n\nCommand: `{command}`\n\n"
            f"Settings: {settings}\n\n{tables}\n\n{MARKER}{kept}")


if __name__ == "__main__":
    main()
