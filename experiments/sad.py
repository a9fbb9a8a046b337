"""SAD on mnist5k/small_cnn: Table-4-style ratio sweep, the Section 4.6 ablations, AT+SAD, and
the cost of a SAD configuration next to the cost of its base model.

Every configuration is built and "trained" through the orchestrator's own trial path
(``build_setup`` + ``train``), so base models are trained once, cached under RUN_DIR/bases and
reused, exactly as in a sweep. Each attack runs alone on the clean-correct test points (its own
column); ``worst`` is the per-example worst case over all of them, followed by Square on the
survivors (Square is too expensive to run alone on every point here).

    nice -n 10 python experiments/sad.py                 # writes the table into docs/sad.md
    nice -n 10 python experiments/sad.py --quick         # a smoke run, docs untouched
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defenses.core import data as data_lib  # noqa: E402
from defenses.attacks import PGD, make  # noqa: E402
from defenses.attacks.adaptive import BPDA, transfer_pgd  # noqa: E402
from defenses.sad import SALIENCY_STEP  # noqa: E402
from orchestrator.training import base_key  # noqa: E402
from orchestrator.spec import parse  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, complain, device_of  # noqa: E402
from orchestrator.training import build_setup, train  # noqa: E402

log = logging.getLogger("experiments.sad")
DOC = Path(__file__).resolve().parents[1] / "docs" / "sad.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

SETTINGS = {"dataset": "mnist5k", "model": "small_cnn", "epochs": 3, "train_samples": 2000,
            "batch_size": 100, "eval": 100, "eps": 0.3, "train_steps": 5,
            "eot_samples": 8, "square": 1000}
QUICK = {**SETTINGS, "epochs": 1, "train_samples": 300, "eval": 40, "eot_samples": 2, "square": 100}

# (label, hyperparameters): the ratio sweep, the two ablations, the BN-estimation choices, AT+SAD
CONFIGS = [
    ("Φ⁰ standard (no SAD)", {"ratio": 0.0, "variant": "no_bn"}),
    # η = 0 is the second ablation exactly: BN on x_adv, no saliency at either stage
    ("SAD η=0 ≡ BN on x_adv, no saliency (ablation 2)", {"ratio": 0.8, "variant": "bn_adv"}),
    *[(f"SAD η={r:g}", {"ratio": r}) for r in (0.2, 0.5, 0.8, 1.2, 2.0, 4.0)],
    *[(f"no BN update, η={r:g} (Table 5)", {"ratio": r, "variant": "no_bn"}) for r in (0.8, 2.0)],
    ("SAD η=0.8, full pass, EMA 0.1", {"ratio": 0.8, "bn_samples": None, "bn_momentum": 0.1}),
    ("Φ⁰ TRADES (no SAD)", {"ratio": 0.0, "variant": "no_bn", "base": "trades"}),
    *[(f"AT+SAD η={r:g}", {"ratio": r, "base": "trades"}) for r in (0.8, 2.0)],
]


def make_spec(cfg: dict) -> object:
    return parse({"dataset": cfg["dataset"], "model": cfg["model"], "epochs": cfg["epochs"],
                  "train_samples": cfg["train_samples"], "eval_samples": cfg["eval"],
                  "batch_size": cfg["batch_size"],
                  "threat_model": {"eps": cfg["eps"], "attacks": ["pgd-20"],
                                   "train_steps": cfg["train_steps"]},
                  "defenses": ["sad"]})


def attacks_for(defense, cfg: dict) -> dict[str, object]:
    """Column -> attack: the paper's four (``SAD.paper_attacks``, MNIST-scaled) on the
    predictor a naive evaluator would attack, then the adaptive ones at K = 20 steps."""
    eps = cfg["eps"]
    weak, strong, cw, eot = defense.paper_attacks(eps, eot_samples=cfg["eot_samples"])
    attacks = {"WeakPGD (pgd-20, ε/2)": weak, "StrongPGD (pgd-20)": strong, "C&W (c=0.2)": cw,
               f"EOT-PGD (12 steps × {cfg['eot_samples']}, σ=ε/3)": eot,
               "transfer from Φ⁰ (pgd-20)": transfer_pgd(defense.base, eps, steps=20)}
    if defense.uses_saliency:
        attacks["BPDA (pgd-20)"] = BPDA(defense.predictor(), eps, step=SALIENCY_STEP, steps=20)
        attacks["full diff. (pgd-20, create_graph)"] = PGD(defense.differentiable_predictor(), eps, steps=20)
    return attacks


def correct_mask(defense, x, y, batch: int = 100) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out.append(defense.predict(x[i:i + batch]).logits.argmax(1) == y[i:i + batch])
    return torch.cat(out)


def survives(defense, attack, x, y, alive: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Which of the ``alive`` points still get the right label after ``attack``."""
    keep = alive.clone()
    idx = alive.nonzero().squeeze(1)
    for i in range(0, len(idx), batch):
        j = idx[i:i + batch]
        torch.manual_seed(0)
        adv = attack(x[j], y[j])
        keep[j] = correct_mask(defense, adv, y[j], batch)
    return keep


def evaluate(defense, x, y, cfg: dict) -> dict:
    t0 = time.perf_counter()
    clean = correct_mask(defense, x, y)
    row = {"clean": clean.float().mean().item()}
    worst = clean.clone()
    for name, attack in attacks_for(defense, cfg).items():
        t = time.process_time()
        robust = survives(defense, attack, x, y, clean)
        log.info("%s: %.1f CPU s", name, time.process_time() - t)
        row[name] = robust.float().mean().item()
        worst &= robust
    row["worst of the above"] = worst.float().mean().item()
    square = make(f"square-{cfg['square']}", defense.predictor(), cfg["eps"])
    row[f"worst + Square-{cfg['square']}"] = survives(defense, square, x, y, worst).float().mean().item()
    row["eval_s"] = time.perf_counter() - t0
    return row


def run(cfg: dict, run_dir: Path, device: torch.device) -> list[dict]:
    spec = make_spec(cfg)
    rows = []
    for label, hp in CONFIGS:
        s = build_setup(spec, "sad", hp, device, run_dir)
        seconds = train(s, spec.epochs)
        n = cfg["eval"]
        x = data_lib.as_float(s.data.test_x[:n], device)
        y = s.data.test_y[:n].to(device)
        key = base_key(spec, type(s.defense).base_model(s.defense.params))
        base = torch.load(run_dir / "bases" / key / "checkpoint.pt", map_location="cpu", weights_only=True)
        row = {"config": label, "hp": hp, "sad_train_s": seconds,
               "base_train_s": float(base["train_seconds"]), **evaluate(s.defense, x, y, cfg)}
        log.info("%s", json.dumps(row))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    skip = {"config", "hp", "sad_train_s", "base_train_s", "eval_s"}
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in skip and k not in columns]
    # attacks in the order they were run, the worst-case columns last
    columns = [c for c in columns if not c.startswith("worst")] + [c for c in columns if c.startswith("worst")]
    head = "| configuration | " + " | ".join(columns) + " | SAD pass s / base s |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = [f"{100 * row[c]:.0f}" if c in row else "–" for c in columns]
        sad = row["sad_train_s"]
        cost = "–" if "no SAD" in row["config"] else \
            f"{sad:.1f} / {row['base_train_s']:.1f} ({100 * sad / row['base_train_s']:.0f} %)"
        lines.append(f"| {row['config']} | " + " | ".join(cells) + f" | {cost} |")
    return "\n".join(lines)


def write_doc(rows: list[dict], cfg: dict, command: str) -> None:
    block = "\n".join([
        START, "",
        f"Command: `{command}`", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), "",
        "Robust accuracy in % of the evaluation images (clean errors count as broken); each attack "
        "column is that attack alone. The last two columns are the per-example worst case.", "",
        table(rows), "", END])
    text = DOC.read_text() if DOC.exists() else f"# SAD\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    DOC.write_text(head + block + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; does not touch docs/sad.md")
    ap.add_argument("--run-dir", default="/tmp/sad-experiment", help="where base models are cached")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run (default: all)")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite docs/sad.md from RUN_DIR/results.json without running anything")
    add_device_options(ap, threads=1)
    args = ap.parse_args()
    try:
        device = device_of(args)
    except BadInput as e:
        sys.exit(complain(ap.prog, str(e)))
    if args.table_only:
        rows = json.loads((Path(args.run_dir) / "results.json").read_text())
        write_doc(rows, SETTINGS, f"nice -n 10 python experiments/sad.py --run-dir {args.run_dir}")
        print(table(rows))
        return
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    cfg = QUICK if args.quick else SETTINGS
    global CONFIGS
    if args.only:
        CONFIGS = [CONFIGS[i] for i in args.only]
    run_dir = Path(args.run_dir)
    rows = run(cfg, run_dir, device)
    (run_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if not args.quick and not args.only:
        write_doc(rows, cfg, "nice -n 10 python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
