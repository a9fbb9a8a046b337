"""The claim ledger (docs/claims.md) and the AutoAttack sanity check, from real runs.

    python experiments/claims.py [--run-dir runs/claims] [--samples 1000] [--sanity-samples 1000]
                                 [--only sanity|ledger] [--out docs/claims.md]

Every seed defense that is registered gets its papers' headline claims checked on
mnist5k/small_cnn: the paper's number (its dataset and model), our number under the paper's own
attack (its attack, steps and metric, at an MNIST ε), and our number under the strongest attack
we have: the default preset's final cascade, a reduced AutoAttack (the ``reduced`` preset:
APGD-CE, APGD-T, FAB-T, Square) followed by the defense's own adaptive attacks (the ``adaptive``
preset: BPDA / full differentiation through saliency steps, EOT, transfer, detector-aware
attacks) and the gradient-masking checks, whose attacks count too. Every accuracy carries its
95 % Wilson interval, every detection rate the count it is a share of.

Models are trained once and kept under ``--run-dir`` (models/<config>/checkpoint.pt, base models
under bases/), evaluations are cached as JSON (evals/), so a rerun after more defenses land only
computes what is new. Settings are reduced for a shared 2-core CPU and stated in the output.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from defenses import attacks as attack_lib  # noqa: E402
from defenses.attacks import PGD  # noqa: E402
from defenses.evaluation import benchmark as eval_lib  # noqa: E402
from defenses.core import registry  # noqa: E402
from defenses.core.base import BaseModelRequest  # noqa: E402
from defenses.core.cache import atomic_write  # noqa: E402
from defenses.evaluation.detection import craft, detection_report  # noqa: E402
from orchestrator.cli import add_device_options, parse_with_device  # noqa: E402
from orchestrator.training import ensure_base  # noqa: E402
from orchestrator.evaluate import eval_data, restore  # noqa: E402
from orchestrator.spec import SweepSpec, parse  # noqa: E402
from orchestrator.stats import accuracy_interval  # noqa: E402
from orchestrator.training import TrialSetup, build_setup, save_checkpoint, train  # noqa: E402

EPS = 0.3
EPOCHS = 5
SETTINGS = {"name": "claims", "dataset": "mnist5k", "model": "small_cnn", "epochs": EPOCHS,
            "train_samples": 2000, "batch_size": 50, "optimizer": {"name": "adam", "lr": 1e-3},
            "threat_model": {"eps": EPS, "attacks": ["fast"], "train_steps": 5},
            "defenses": ["standard"]}
# AutoAttack "standard" at reduced budgets (the preset runs 100 steps, 9 targets, 5000 queries)
STRONG = eval_lib.REDUCED
SANITY_PGD = ("pgd-40",)
FOUNDATION = ("fgsm", "pgd-40", "pgd_cw-40")


@dataclasses.dataclass(frozen=True)
class Model:
    key: str                      # folder name under models/
    defense: str
    hp: tuple[tuple[str, Any], ...] = ()
    epochs: int | None = None     # fewer than EPOCHS for the costly trainings
    base: bool = False            # the model *is* a base model (standard, pgd_at): shared cache


@dataclasses.dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    paper_number: str
    model: Model
    paper_attacks: tuple[str, ...]   # the paper's attack, reproduced on our setting
    eps: float = EPS
    metric: str = "robust"           # robust | detection (detection rate of each paper attack)
    note: str = ""
    ref: "Model | None" = None       # the model the claim compares with (same evaluation)


STANDARD = Model("standard", "standard", base=True)
PGD_AT = Model("pgd_at", "pgd_at", base=True)

CLAIMS: list[Claim] = [
    Claim("baseline", "Standard training has no robustness (AutoAttack ≈ PGD ≈ 0).",
          "—", STANDARD, ("pgd-40",)),
    Claim("baseline (Madry et al.)", "PGD-AT is robust and not gradient-masked: AutoAttack "
          "within a few points of PGD-40.", "—", PGD_AT, ("pgd-40",)),
    Claim("000 SAD", "SAD makes a naturally trained model robust without adversarial training "
          "(Table 1: ResNet-18, StrongPGD = PGD-20 at 8/255).",
          "CIFAR-10 ResNet-18: clean 83.86 %, PGD-20 52.61 %", Model("sad", "sad", (("ratio", 0.8),)),
          ("pgd-20",), note="paper's attack = PGD-20 on the SAD prediction (saliency step not "
                            "differentiated); ε = 0.3 for MNIST", ref=STANDARD),
    Claim("003 SAT", "SAT with an adversarially trained teacher's guided-backprop maps beats the "
          "original model under PGD-5 (Table 1, ε = 1/255).",
          "CIFAR-10: SAT 63.33 % vs original 47.71 % (PGD-5, 1/255)",
          Model("sat", "sat", (("teacher", "pgd_at"), ("method", "guided_backprop"),
                               ("eps0", 0.3), ("variant", "sat"))),
          ("pgd-5",), eps=0.1, note="ε0 = 0.3 (the paper's ε0 = training ε); evaluated at ε = 0.1, "
                                    "MNIST's analogue of the paper's small ε", ref=STANDARD),
    Claim("003 SAT", "PGD-SAT improves on PGD-AT by 1.5–3 points (Table 1).",
          "CIFAR-10 ε = 4/255: PGD-SAT 62.49 % vs PGD 55.04 % (PGD-5)",
          Model("pgd_sat", "sat", (("teacher", "pgd_at"), ("method", "guided_backprop"),
                                   ("eps0", 0.3), ("variant", "pgd_sat")), epochs=3),
          ("pgd-5",), note="3 epochs (CPU), PGD-AT 5", ref=PGD_AT),
    Claim("004 ATAT", "Attention transfer + logit pairing beats PGD-AT by a wide margin "
          "(Table 1, PGD-20 at 8/255).",
          "CIFAR-10 WRN: ATAT 63.81 % vs AT-PGD 45.87 % (PGD-20); clean 91.89 %",
          Model("atat", "atat", (("lambda1", 1.0), ("lambda2", 1.0)), epochs=2),
          ("fgsm", "pgd-20"), note="2 epochs from the standard teacher (CPU), PGD-AT 5",
          ref=PGD_AT),
    Claim("002 Grad-CAM detector", "Saliency emphasis θ = 0.1 with zero mean detects FGSM and "
          "C&W while keeping clean accuracy (Table III/V).",
          "VGG16 ImageNet: OSPA 93.7 %, detection FGSM 82.8 %, C&W2 69.6 %",
          Model("gradcam_zm", "gradcam_detector", (("theta", 0.1), ("enhancement", "zero_mean"),
                                                   ("rule", "paper"))),
          ("fgsm", "cw-50"), metric="detection",
          note="C&W-L2 (50 steps) projected onto the L∞ ball of ε = 0.3"),
    Claim("002 Grad-CAM detector", "Saliency emphasis alone, θ = 0.5 (Table I).",
          "VGG16: OSPA 69.5 %, detection FGSM 68.4 %, C&W2 76.8 %",
          Model("gradcam_05", "gradcam_detector", (("theta", 0.5), ("enhancement", "none"),
                                                   ("rule", "paper"))),
          ("fgsm", "cw-50"), metric="detection"),
    Claim("002 (Xu et al.)", "Feature squeezing, the baseline of paper 002 (Table IV/V).",
          "VGG16: OSPA 78.6 %, detection FGSM 50.6 % (5-bit, 2×2, NLM)",
          Model("feature_squeezing", "feature_squeezing", (("bit_depth", 1), ("median_size", 2))),
          ("fgsm", "cw-50"), metric="detection",
          note="Xu et al.'s MNIST squeezers (1-bit, 2×2 median)"),
    Claim("001 saliency detector", "Salient-pixel detector (SPD) trained on FGSM detects other, "
          "stronger attacks (Fig. 2; values only in the figure/appendix).",
          "figure only (MNIST/CIFAR-10/ASSIRA)",
          Model("spd", "saliency_detector", (("detector", "spd"), ("train_attack", "fgsm"))),
          ("fgsm", "mim-10", "cw-50"), metric="detection"),
    Claim("001 saliency detector", "SPD outperforms the saliency-map detector SMD (Fig. 2).",
          "figure only", Model("smd", "saliency_detector", (("detector", "smd"),
                                                            ("train_attack", "fgsm"))),
          ("fgsm", "mim-10", "cw-50"), metric="detection"),
]


# ---------------------------------------------------------------- models

def spec(run_dir: Path) -> SweepSpec:
    s = parse({**SETTINGS, "defenses": sorted({c.model.defense for c in CLAIMS} & set(registry.names()))})
    (run_dir / "spec.json").write_text(json.dumps(s.model_dump(), indent=1))
    return s


def checkpoint(m: Model, sp: SweepSpec, run_dir: Path, device: torch.device) -> Path:
    """The trained model of ``m`` (trained now, on ``device``, unless cached)."""
    if m.base:
        return ensure_base(sp, BaseModelRequest(defense=m.defense), run_dir, device)
    folder = run_dir / "models" / m.key
    if not (folder / "checkpoint.pt").is_file():
        t0 = time.time()
        s = build_setup(sp, m.defense, dict(m.hp), device, run_dir)
        seconds = train(s, m.epochs or sp.epochs)
        save_checkpoint(folder, s, m.epochs or sp.epochs, seconds)
        print(f"trained {m.key} in {time.time() - t0:.0f} s", flush=True)
    return folder / "checkpoint.pt"


def lazy_setup(m: Model, sp: SweepSpec, run_dir: Path,
               device: torch.device) -> Callable[[], TrialSetup]:
    """The restored model of ``m``, trained and loaded on first call only: a rerun whose
    evaluations are all cached (e.g. the committed experiments/claims_evals copied into a fresh
    run dir) trains nothing."""
    return functools.cache(lambda: restore(checkpoint(m, sp, run_dir, device), sp, run_dir, device))


# ---------------------------------------------------------------- evaluations (cached)

def code_digest(defense: str) -> str:
    """Digest of the code an evaluation of ``defense`` runs: its class's modules (with their
    base classes'), the evaluation library and the attacks. An evaluation is redone when any
    changes; trained models are kept (delete models/<config> to retrain one)."""
    cls = registry.get(defense)
    files = {Path(inspect.getsourcefile(k)) for k in inspect.getmro(cls)
             if k.__module__.startswith("defenses.")}
    root = Path(__file__).resolve().parent.parent / "defenses"
    files |= {*(root / "evaluation").glob("*.py"), *(root / "attacks").glob("*.py")}
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


# seconds each evaluation used took when it ran (cached or now), by its file: the ledger's cost,
# whichever runs computed it, each evaluation once however many rows read it
EVAL_SECONDS: dict[Path, float] = {}


def cached(run_dir: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = run_dir / "evals" / f"{key['model']}-{key['what']}-{digest}.json"
    if path.is_file():
        out = json.loads(path.read_text())
    else:
        t0 = time.time()
        out = compute()
        out["seconds"] = time.time() - t0
        # atomic: a run killed mid-write leaves no half file for the next run to trip on
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
        print(f"  {key['model']} {key['what']}: {out['seconds']:.0f} s", flush=True)
    EVAL_SECONDS[path] = out.get("seconds", 0.0)
    return out


def robust_eval(s: TrialSetup, attacks: tuple[str, ...], eps: float, n: int, adaptive: bool,
                masking: bool) -> dict[str, Any]:
    x, y = eval_data(s, n)
    torch.manual_seed(0)
    espec = eval_lib.EvalSpec.for_dataset(s.spec.dataset, eps, [], 64 if masking else 0,
                                          attacks=attacks, adaptive=adaptive, seed=0)
    rep = eval_lib.evaluate(s.defense, (x, y), espec)
    r = rep.primary
    return {"clean": r.clean_acc, "robust": r.robust_acc, "acc": r.acc, "n": r.n,
            "attacks": r.robust_attack, "flags": rep.flags, "evidence": rep.evidence}


def detection_eval(s: TrialSetup, attacks: tuple[str, ...], eps: float, n: int) -> dict[str, Any]:
    x, y = eval_data(s, n)
    torch.manual_seed(0)
    built = [attack_lib.make(a, s.defense.model, eps) for a in attacks]
    report = detection_report(s.defense, x, y, craft(built, x, y))
    return {"ospa": report.ospa, "fpr": report.fpr, "classifier_acc": report.classifier_acc,
            "n": report.n, "detection": {k: v.detection_rate for k, v in report.attacks.items()},
            "fooled": {k: v.fooled for k, v in report.attacks.items()},
            "robust_each": {k: v.robust_acc for k, v in report.attacks.items()}}


# ---------------------------------------------------------------- the two tables

def pct(v: float, n: int | None = None) -> str:
    """``48.0 %``, or with the ``n`` points it was measured on ``48.0 % [43.6, 52.4]`` (95 %
    Wilson interval)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if not n:
        return f"{100 * v:.1f} %"
    low, high = accuracy_interval(v, n)
    return f"{100 * v:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def rate(v: float, of: int) -> str:
    """A detection rate with the count it is a share of: ``82.0 % (41/50) [69.2, 90.2]``."""
    if of == 0 or v is None or (isinstance(v, float) and math.isnan(v)):
        return "— (0 fooled)"
    low, high = accuracy_interval(v, of)
    return f"{100 * v:.1f} % ({round(v * of)}/{of}) [{100 * low:.1f}, {100 * high:.1f}]"


def sanity(run_dir: Path, sp: SweepSpec, n: int, device: torch.device) -> list[str]:
    """AutoAttack (reduced) against PGD-40 (Madry's step 2.5ε/40, one random start, last
    iterate), and two PGD-40 variants that tell a weak PGD from a masked model: five restarts,
    and a larger step (ε/4)."""
    rows = ["| model | clean | PGD-40 | PGD-40 ×5 restarts | PGD-40, step ε/4 | AutoAttack (reduced) "
            "| fgsm → pgd-40 → pgd_cw-40 | AA − PGD-40 | flags (AutoAttack run) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in (STANDARD, PGD_AT):
        s = lazy_setup(m, sp, run_dir, device)
        key = {"model": m.key, "n": n, "eps": EPS, "code": code_digest(m.defense)}
        pgd = cached(run_dir, {**key, "what": "pgd40"},
                     lambda: robust_eval(s(), SANITY_PGD, EPS, n, False, False))
        restarts = cached(run_dir, {**key, "what": "pgd40x5"}, lambda: robust_eval(
            s(), (PGD(s().defense.predictor(), EPS, steps=40, restarts=5),), EPS, n, False, False))
        big = cached(run_dir, {**key, "what": "pgd40-big-step"}, lambda: robust_eval(
            s(), (PGD(s().defense.predictor(), EPS, steps=40, alpha=EPS / 4),), EPS, n, False, False))
        aa = cached(run_dir, {**key, "what": "aa", "attacks": STRONG},
                    lambda: robust_eval(s(), STRONG, EPS, n, False, True))
        fnd = cached(run_dir, {**key, "what": "foundation"},
                     lambda: robust_eval(s(), FOUNDATION, EPS, n, False, False))
        raised = ", ".join(k for k, v in aa["flags"].items() if v) or "none"
        rows.append(f"| {m.key} | {pct(pgd['clean'], n)} | {pct(pgd['robust'], n)} "
                    f"| {pct(restarts['robust'], n)} | {pct(big['robust'], n)} "
                    f"| {pct(aa['robust'], n)} ({_steps(aa)}) | {pct(fnd['robust'], n)} "
                    f"| {100 * (aa['robust'] - pgd['robust']):+.1f} pts | {raised} |")
    return rows


def _steps(result: dict[str, Any]) -> str:
    return ", ".join(f"{a} {pct(v)}" for a, v in result["acc"].items())


def ledger(run_dir: Path, sp: SweepSpec, n: int, device: torch.device) -> tuple[list[str], list[str]]:
    rows = ["| paper | claim | paper's number | ours: paper's attack | ours: strongest attack "
            "(reduced AutoAttack + adaptive) | paper's attack − strongest | vs reference "
            "(strongest) | flags | note |", "|---|---|---|---|---|---|---|---|---|"]
    skipped: list[str] = []
    strongest: dict[tuple[str, float], dict[str, Any]] = {}
    for c in CLAIMS:
        if c.model.defense not in registry.names():
            skipped.append(f"{c.paper}: defense {c.model.defense!r} not registered when this ran")
            continue
        try:
            paper, strong = evaluate_claim(c, run_dir, sp, n, device)
        except Exception as e:  # a defense still being written: say so, keep the ledger going
            skipped.append(f"{c.paper} ({c.model.key}): {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        strongest[(c.model.key, c.eps)] = strong
        ref = strongest.get((c.ref.key, c.eps)) if c.ref is not None else None
        if c.ref is not None and ref is None:  # the reference at this ε: evaluate it too
            ref = evaluate_claim(dataclasses.replace(c, model=c.ref, metric="robust", ref=None),
                                 run_dir, sp, n, device)[1]
        rows.append(ledger_row(c, paper, strong, ref))
    return rows, skipped


def evaluate_claim(c: Claim, run_dir: Path, sp: SweepSpec, n: int,
                   device: torch.device) -> tuple[dict, dict]:
    """(the paper's attack, the strongest cascade) on the claim's model, cached."""
    s = lazy_setup(c.model, sp, run_dir, device)
    key = {"model": c.model.key, "n": n, "eps": c.eps, "code": code_digest(c.model.defense)}
    if c.metric == "detection":
        paper = cached(run_dir, {**key, "what": "detection", "attacks": c.paper_attacks},
                       lambda: detection_eval(s(), c.paper_attacks, c.eps, n))
    else:
        attacks = paper_attacks_of(c)
        paper = cached(run_dir, {**key, "what": "paper", "attacks": attacks},
                       lambda: robust_eval(s(), attacks, c.eps, n, False, False))
    strong = cached(run_dir, {**key, "what": "strongest", "attacks": STRONG},
                    lambda: robust_eval(s(), (*STRONG, "adaptive"), c.eps, n, True, True))
    return paper, strong


def paper_attacks_of(c: Claim) -> tuple[str, ...]:
    """The ``paper`` preset when the defense defines its paper setting, else the claim's own
    reproduction of the paper's attack."""
    try:
        eval_lib.check_paper(registry.get(c.model.defense), ["paper"])
    except eval_lib.EvalConfigError:
        return c.paper_attacks
    return ("paper",)


def ledger_row(c: Claim, paper: dict, strong: dict, ref: dict | None) -> str:
    n = strong["n"]
    if c.metric == "detection":
        ours_paper = (f"OSPA {pct(paper['ospa'], paper['n'])}, FPR {pct(paper['fpr'], paper['n'])}; "
                      "detection " + ", ".join(f"{a} {rate(v, paper['fooled'][a])}"
                                               for a, v in paper["detection"].items()))
        paper_robust = min(paper["robust_each"].values())  # benchmark's rule, worst paper attack
    else:
        ours_paper = (f"clean {pct(paper['clean'], paper['n'])}, {' → '.join(paper['acc'])} "
                      f"{pct(paper['robust'], paper['n'])}")
        paper_robust = paper["robust"]
    gap = f"{100 * (paper_robust - strong['robust']):+.1f} pts (robust acc.)"
    vs = "—" if ref is None else (f"{100 * (strong['robust'] - ref['robust']):+.1f} pts robust, "
                                  f"{100 * (strong['clean'] - ref['clean']):+.1f} pts clean vs "
                                  f"{c.ref.key}")
    raised = ", ".join(k for k, v in strong["flags"].items() if v) or "none"
    return (f"| {c.paper} | {c.claim} | {c.paper_number} | {ours_paper} (ε = {c.eps:g}) "
            f"| clean {pct(strong['clean'], n)}, robust {pct(strong['robust'], n)} after "
            f"{len(strong['acc'])} attacks{_last_breaker(strong)} | {gap} | {vs} | {raised} "
            f"| {c.note} |")


def _last_breaker(strong: dict[str, Any]) -> str:
    """The attack that broke the most points after the first one (which attacks mattered)."""
    drops, prev = {}, strong["clean"]
    for name, acc in strong["acc"].items():
        drops[name], prev = prev - acc, acc
    big = [k for k, v in sorted(drops.items(), key=lambda kv: -kv[1]) if v > 0][:2]
    return f" (most broken by {', '.join(big)})" if big else ""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/claims")
    p.add_argument("--samples", type=int, default=1000, help="test images per ledger evaluation "
                   "(mnist5k's whole test split by default)")
    p.add_argument("--sanity-samples", type=int, default=1000)
    p.add_argument("--only", choices=["sanity", "ledger"], default=None)
    p.add_argument("--out", default="docs/claims.md")
    add_device_options(p, threads=1)
    args, device = parse_with_device(p)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sp = spec(run_dir)
    t0 = time.time()
    sanity_rows = sanity(run_dir, sp, args.sanity_samples, device) if args.only != "ledger" else []
    ledger_rows, skipped = (ledger(run_dir, sp, args.samples, device) if args.only != "sanity"
                            else ([], []))
    write(Path(args.out), args, sanity_rows, ledger_rows, skipped, time.time() - t0)


def write(out: Path, args, sanity_rows, ledger_rows, skipped, seconds) -> None:
    command = (f"python experiments/claims.py --run-dir {args.run_dir} --samples {args.samples} "
               f"--sanity-samples {args.sanity_samples}" + (f" --only {args.only}" if args.only else ""))
    text = ["# Claim ledger (mnist5k / small_cnn, L∞)\n",
            f"Generated by `{command}` ({seconds:.0f} s this run; the evaluations took "
            f"{sum(EVAL_SECONDS.values()):,.0f} s when they ran, training not counted). Trained models and "
            "evaluations are cached under the run dir, so a ledger can be assembled over several "
            "runs: a model retrained in a later run (torch on CPU is not bit-identical across "
            "machines) has its evaluations redone, and a row's reference model may then be a "
            "retraining of the one its defense started from (e.g. ATAT's standard teacher).\n",
            "Settings (reduced for a shared 2-core CPU): Adam lr 1e-3, batch 50, the first 2,000 "
            f"training images, {EPOCHS} epochs unless a row says otherwise; adversarial training "
            "uses PGD-5 (step 2.5ε/5) at ε = 0.3. Brackets: 95 % Wilson intervals; a detection "
            "rate shows (rejected/fooled), the successful adversarials it is a share of. "
            "\"Reduced AutoAttack\" = "
            f"{', '.join(STRONG)} (APGD/FAB steps, target classes and Square queries below "
            "AutoAttack's 100 / 9 / 5000), run as one cascade; \"strongest\" appends the defense's "
            "own adaptive attacks (`adaptive` preset) to that cascade. The Grad-CAM detector "
            "rows apply the paper's decision rule (`rule: paper`), as the claim is stated, not a "
            "threshold calibrated to a target FPR: their FPR is in the cell. Flags are the "
            "gradient-masking indicators of `defenses.evaluation.masking` on that evaluation.\n"]
    if sanity_rows:
        text += ["## Sanity check: AutoAttack vs PGD-40\n",
                 f"ε = 0.3, the first {args.sanity_samples} test images. Each column is its own "
                 "cascade on the same images. These models are the ledger's short trainings; on a "
                 "converged PGD-AT (30 epochs, `experiments/aa_sanity.py`, docs/evaluation.md) "
                 "the reduced AutoAttack is 2.8 points below PGD-40 on 1,000 test images (AutoAttack "
                 "at its own budgets: 3.0 points, on 300).\n",
                 "\n".join(sanity_rows) + "\n"]
    if ledger_rows:
        text += ["## Ledger\n",
                 f"The first {args.samples} test images. The paper's numbers are from its own "
                 "dataset and model (none of the five papers reports mnist5k); what carries over "
                 "is the direction of a claim, not its value. Detection rate = share of the "
                 "successful adversarial examples (crafted on the guarded classifier) that the "
                 "detector rejects; OSPA = clean inputs correct and accepted.\n",
                 "\n".join(ledger_rows) + "\n"]
    if skipped:
        text += ["Not in the ledger this run:\n", "\n".join(f"- {s}" for s in skipped) + "\n"]
    atomic_write(out, lambda tmp: tmp.write_text("\n".join(text)))
    print("\n".join(text))


if __name__ == "__main__":
    main()
