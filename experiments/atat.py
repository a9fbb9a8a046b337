"""ATAT's "Must show" numbers on mnist5k/small_cnn (L∞ ε = 0.3): a λ₁ × λ₂ grid with clean and
worst-case robust accuracy (cascade FGSM → PGD-40 → PGD-CW-30), the λ₁ = λ₂ = 0 point against
``pgd_at`` with ``clean_weight=1`` (same seed, epochs, data), AutoAttack on a test subset for the
reference and the best ATAT configuration, and ATAT's extra training cost over PGD-AT.

    nice -n 10 python experiments/atat.py [--train-samples 1000] [--epochs 3] [--eval-samples 300]
        [--aa-samples 100] [--run-dir runs/atat_experiment] [--doc docs/atat.md]

Finished trials are kept in RUN_DIR/results.json and skipped when the script is run again. The
generated part of the doc (between the GENERATED markers) is replaced; the text around it stays.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from defenses.core import data as data_lib  # noqa: E402
from defenses.core import models as model_lib  # noqa: E402
from defenses.core.cache import atomic_write  # noqa: E402
from defenses.atat import ATAT, ATATParams  # noqa: E402
from defenses.core.base import NoParams, ThreatModel  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from defenses.pgd_at import PGDAT, PGDATParams  # noqa: E402
from defenses.standard import Standard  # noqa: E402
from orchestrator.cli import add_device_options, parse_with_device, trial_resources  # noqa: E402
from orchestrator.spec import parse  # noqa: E402
from orchestrator.trial import LocalReporter, run_trial  # noqa: E402
from orchestrator.training import CHECKPOINT_FILE  # noqa: E402

ATTACKS = ["fgsm", "pgd-40", "pgd_cw-30"]
LAMBDA1 = [0.0, 1.0, 3.0]
LAMBDA2 = [0.0, 1.0, 3.0]
BEGIN, END = "<!-- BEGIN GENERATED (experiments/atat.py) -->", "<!-- END GENERATED -->"


def make_spec(args, seed: int, device: torch.device):
    return parse({"name": "atat_experiment", "dataset": "mnist5k", "model": "small_cnn",
                  "epochs": args.epochs, "train_samples": args.train_samples,
                  "eval_samples": args.eval_samples, "batch_size": 100, "seed": seed,
                  "optimizer": {"name": "adam", "lr": 1e-3},
                  "threat_model": {"eps": 0.3, "attacks": ATTACKS, "train_steps": 5},
                  "defenses": ["atat", "pgd_at"], "resources": trial_resources(device, args.threads)})


def configs() -> list[dict]:
    """The grid (init from the teacher, as the paper), then the λ = 0 checks against pgd_at.
    The grid runs first so the teacher is cached before the random-init λ = 0 trial: then that
    trial's random stream is the one pgd_at sees (see docs/atat.md)."""
    grid = [{"id": f"atat_l1={l1:g}_l2={l2:g}_teacher", "defense": "atat", "seed": 0,
             "hp": {"lambda1": l1, "lambda2": l2, "init": "teacher"}}
            for l1 in LAMBDA1 for l2 in LAMBDA2]
    return grid + [
        {"id": "atat_l1=0_l2=0_random", "defense": "atat", "seed": 0,
         "hp": {"lambda1": 0.0, "lambda2": 0.0, "init": "random"}},
        {"id": "pgd_at_cw=1_seed0", "defense": "pgd_at", "seed": 0, "hp": {"clean_weight": 1.0}},
        {"id": "pgd_at_cw=1_seed1", "defense": "pgd_at", "seed": 1, "hp": {"clean_weight": 1.0}},
    ]


def run_all(args, run_dir: Path, results: dict, device: torch.device) -> None:
    for cfg in configs():
        if cfg["id"] in results:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        reporter = LocalReporter(run_dir / "trials" / cfg["id"], cfg["id"])
        rec = run_trial({"defense": cfg["defense"], "hp": cfg["hp"], "spec": make_spec(args, cfg["seed"], device),
                         "run_dir": str(run_dir), "trial_id": cfg["id"]}, reporter)
        if rec.status != "completed":
            raise RuntimeError(f"{cfg['id']} failed: {rec.error}")
        epochs = [r for r in reporter.results if r.get("status") == "running"]
        results[cfg["id"]] = {
            **cfg, "clean_acc": rec.clean_acc, "robust_acc": rec.robust_acc, "acc": rec.acc,
            "train_seconds": rec.train_seconds, "eval_seconds": rec.eval_seconds,
            "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "last_epoch": {k: epochs[-1][k] for k in ("loss", "ce", "l_at", "l_lp") if k in epochs[-1]},
            "checkpoint": str(reporter.checkpoint_dir / CHECKPOINT_FILE)}
        save(run_dir, results)
        print(f"{cfg['id']}: clean {rec.clean_acc:.3f} robust {rec.robust_acc:.3f} {rec.acc} "
              f"train {rec.train_seconds:.0f}s", flush=True)


def save(run_dir: Path, results: dict) -> None:
    atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


def best_atat(results: dict) -> str:
    """The grid point with the highest worst-case robust accuracy among those using a term."""
    grid = [r for r in results.values() if r["defense"] == "atat" and r["hp"]["init"] == "teacher"
            and (r["hp"]["lambda1"] or r["hp"]["lambda2"])]
    return max(grid, key=lambda r: (r["robust_acc"], r["clean_acc"]))["id"]


def autoattack(args, results: dict, ids: list[str], device: torch.device) -> None:
    """Cascade FGSM → PGD-40 → PGD-CW-30 → AutoAttack (standard) on the first test images."""
    ds = data_lib.load("mnist5k", seed=0)
    x = data_lib.as_float(ds.test_x[:args.aa_samples], device)
    y = ds.test_y[:args.aa_samples].to(device)
    for trial_id in ids:
        r = results[trial_id]
        if "aa" in r:
            continue
        state = torch.load(r["checkpoint"], map_location="cpu", weights_only=True)
        model = model_lib.build("small_cnn", 10, 1).to(device)
        model.load_state_dict(state["model"])
        defense = Standard(model.eval(), NoParams(), ThreatModel(eps=0.3))  # ATAT predicts plainly
        torch.manual_seed(0)
        res = benchmark(defense, x, y, 0.3, ATTACKS + ["autoattack"], batch_size=256)
        r["aa"] = {"n": res.n, "clean_acc": res.clean_acc, "acc": res.acc,
                   "robust_acc": res.robust_acc, "seconds": res.seconds}
        print(f"{trial_id} on {res.n}: {res.acc}", flush=True)


def step_cpu_seconds(args, device: torch.device, repeats: int = 6) -> dict[str, float]:
    """Process CPU time of one training step (batch 100, PGD-5), same start weights; the
    machine is shared, so CPU time is steadier than the trials' wall-clock train_seconds."""
    torch.manual_seed(0)
    ds = data_lib.load("mnist5k", seed=0)
    x, y = data_lib.as_float(ds.train_x[:100], device), ds.train_y[:100].to(device)
    threat = ThreatModel(eps=0.3, train_steps=5)
    base = model_lib.build("small_cnn", 10, 1).to(device)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    defenses = {"pgd_at (clean_weight=1)": PGDAT(copy.deepcopy(base), PGDATParams(1.0), threat)}
    for l1, l2 in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]:
        d = ATAT(copy.deepcopy(base), ATATParams(l1, l2, "random"), threat)
        d.teacher = teacher
        defenses[f"atat λ₁={l1:g} λ₂={l2:g}"] = d
    times: dict[str, list[float]] = {k: [] for k in defenses}
    for _ in range(repeats):
        for name, d in defenses.items():  # interleaved, so load changes hit every variant alike
            opt = torch.optim.Adam(d.model.parameters(), 1e-3)
            c0 = time.process_time()
            d.model.train()
            loss = d.loss(x, y, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times[name].append(time.process_time() - c0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median


# ------------------------------------------------------------------------ the doc
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def term(last_epoch: dict, key: str) -> str:
    return f"{last_epoch[key]:.3f}" if key in last_epoch else "—"  # weight 0: not computed


def header(args) -> str:
    return (
        "## Results (mnist5k / small_cnn, L∞ ε = 0.3)\n\n"
        f"Command: `nice -n 10 python experiments/atat.py --train-samples {args.train_samples} "
        f"--epochs {args.epochs} --eval-samples {args.eval_samples} --aa-samples {args.aa_samples} "
        f"--run-dir {args.run_dir} --doc {args.doc}`.\n\n"
        f"Settings (reduced for a shared CPU machine): first {args.train_samples} mnist5k training "
        f"images, {args.epochs} epochs, batch 100, Adam lr 1e-3, seed 0; training attack PGD-5 with "
        "step 2.5·ε/5 (the `default` preset's threat model); the teacher is the `standard` base "
        "model trained with the same recipe. Evaluation on the first "
        f"{args.eval_samples} test images with the cascade FGSM → PGD-40 → PGD-CW-30. One training "
        "seed per configuration.\n")


def tables(args, results: dict, cost: dict[str, float], best: str) -> str:
    out = [header(args)]
    out.append("### λ₁ × λ₂ grid (student initialized from the teacher, as in the paper)\n")
    out.append(f"{args.eval_samples} test images. Columns after clean are the cascade: each is the "
               "robust accuracy after that attack and every attack before it, so **robust (worst "
               "case)** = per-example worst case over FGSM, PGD-40 and PGD-CW-30.\n")
    out.append("| λ₁ (L_at) | λ₂ (L_lp) | clean % | after fgsm % | after pgd-40 % | after pgd_cw-30 % | "
               "**robust (worst case) %** | L_at (last epoch) | L_lp (last epoch) | train s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for l1 in LAMBDA1:
        for l2 in LAMBDA2:
            r = results[f"atat_l1={l1:g}_l2={l2:g}_teacher"]
            le = r["last_epoch"]
            out.append(f"| {l1:g} | {l2:g} | {pct(r['clean_acc'])} | "
                       + " | ".join(pct(r["acc"][a]) for a in ATTACKS)
                       + f" | **{pct(r['robust_acc'])}** | {term(le, 'l_at')} | {term(le, 'l_lp')} | "
                       f"{r['train_seconds']:.0f} |")
    out.append("")
    out.append("### λ₁ = λ₂ = 0 against pgd_at (clean_weight = 1: CE(adv) + CE(nat))\n")
    out.append("| run | seed | init | clean % | after fgsm % | after pgd-40 % | after pgd_cw-30 % | "
               "robust (worst case) % | last-epoch loss | train s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    rows = [("atat λ=0", "atat_l1=0_l2=0_random", "random"), ("pgd_at cw=1", "pgd_at_cw=1_seed0", "random"),
            ("pgd_at cw=1", "pgd_at_cw=1_seed1", "random"),
            ("atat λ=0", "atat_l1=0_l2=0_teacher", "teacher")]
    for name, key, init in rows:
        r = results[key]
        out.append(f"| {name} | {r['seed']} | {init} | {pct(r['clean_acc'])} | "
                   + " | ".join(pct(r["acc"][a]) for a in ATTACKS)
                   + f" | {pct(r['robust_acc'])} | {r['last_epoch']['loss']:.7f} | "
                   f"{r['train_seconds']:.0f} |")
    a, p0, p1 = (results[k] for k in ("atat_l1=0_l2=0_random", "pgd_at_cw=1_seed0", "pgd_at_cw=1_seed1"))
    n = args.eval_samples
    checks = []
    for metric in ("clean_acc", "robust_acc"):
        se = math.sqrt(max(p0[metric] * (1 - p0[metric]), 1e-12) / n)
        tol = max(2 * se, abs(p0[metric] - p1[metric]))
        diff = a[metric] - p0[metric]
        checks.append(f"{metric}: atat λ=0 {pct(a[metric])} % vs pgd_at {pct(p0[metric])} % "
                      f"(Δ = {100 * diff:+.1f} points; tolerance {100 * tol:.1f} points = max(2 "
                      f"binomial SE on {n} images, seed-0 vs seed-1 spread of pgd_at)) → "
                      f"{'match' if abs(diff) <= tol else 'NO MATCH'}")
    out.append("\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    if any("aa" in r for r in results.values()):
        out.append(f"### AutoAttack on the first {args.aa_samples} test images\n")
        out.append("Cascade FGSM → PGD-40 → PGD-CW-30 → AutoAttack (torchattacks, version "
                   "'standard': APGD-CE, APGD-T, FAB-T, Square-5000).\n")
        out.append("| run | clean % | after pgd_cw-30 % | **after autoattack (worst case) %** | eval s |")
        out.append("|---|---|---|---|---|")
        for key, r in results.items():
            if "aa" in r:
                aa = r["aa"]
                out.append(f"| {key} | {pct(aa['clean_acc'])} | {pct(aa['acc']['pgd_cw-30'])} | "
                           f"**{pct(aa['robust_acc'])}** | {aa['seconds']:.0f} |")
        out.append("")
    out.append("### Training cost\n")
    base = cost["pgd_at (clean_weight=1)"]
    out.append("CPU seconds of one training step (batch 100, PGD-5, one thread; median of "
               "interleaved repeats):\n")
    out.append("| loss | CPU s / step | ratio to pgd_at |")
    out.append("|---|---|---|")
    for k, v in cost.items():
        out.append(f"| {k} | {v:.3f} | {v / base:.2f} |")
    grid_ts = [results[f"atat_l1={l1:g}_l2={l2:g}_teacher"]["train_seconds"]
               for l1 in LAMBDA1 if l1 for l2 in LAMBDA2]
    pgd_ts = [results[k]["train_seconds"] for k in ("pgd_at_cw=1_seed0", "pgd_at_cw=1_seed1")]
    out.append(f"\nWall-clock train_seconds of the trials (shared, loaded machine: noisy): mean of the "
               f"λ₁ > 0 trials {sum(grid_ts) / len(grid_ts):.0f} s vs pgd_at {sum(pgd_ts) / len(pgd_ts):.0f} s "
               f"(ratio {sum(grid_ts) / len(grid_ts) / (sum(pgd_ts) / len(pgd_ts)):.2f}).\n")
    out.append(f"Best ATAT grid point by worst-case robust accuracy: `{best}`.\n")
    return "\n".join(out)


def write_doc(path: Path, generated: str) -> None:
    block = f"{BEGIN}\n{generated}\n{END}"
    text = path.read_text() if path.exists() else f"# ATAT\n\n{block}\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-samples", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=300)
    p.add_argument("--aa-samples", type=int, default=100, help="0 skips AutoAttack")
    p.add_argument("--run-dir", default="runs/atat_experiment")
    p.add_argument("--doc", default="docs/atat.md")
    add_device_options(p, threads=1)
    args, device = parse_with_device(p)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    run_all(args, run_dir, results, device)
    best = best_atat(results)
    if args.aa_samples:
        autoattack(args, results, ["pgd_at_cw=1_seed0", best], device)
        save(run_dir, results)
    cost = step_cpu_seconds(args, device)
    print(cost, flush=True)
    write_doc(Path(args.doc), tables(args, results, cost, best))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
