"""Paper 001 (model-based saliency detectors) on mnist5k / small_cnn.

1. The cross-attack detection matrix: SMD, SPD, ID and JSD, each trained on clean vs
   adversarial images of ONE attack (FGSM, BIM, MIM, C&W-L2, DeepFool) and tested on every
   attack (+ JSMA, test only): detection rate at a threshold fixed on clean calibration images
   at 5 % FPR, and AUROC.
2. Robust accuracy of the registered ``saliency_detector`` defense (trained as in a trial, on
   FGSM) under the benchmark cascade: FGSM, PGD-20 (classifier only, i.e. detector-unaware),
   then the adaptive attacks: the paper's alternating white-box attack (T = 5), C&W with the
   detector as an extra class, orthogonal PGD; with and without detector adversarial training.

Results go to ``OUT/results.json`` and, as markdown tables, into ``docs/saliency_detector.md``
between the ``results`` markers (the hand-written reading around them is kept). Finished
stages are cached in OUT, so a rerun only computes what is missing.

    nice -n 10 python experiments/saliency_detector.py --out /tmp/saliency_detector_exp
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defenses.core import data as data_lib  # noqa: E402
from defenses.core import models  # noqa: E402
from defenses.attacks import frozen_eval, pgd  # noqa: E402
from defenses.core.base import ThreatModel  # noqa: E402
from defenses.evaluation.detection import roc_auc, threshold_at_fpr  # noqa: E402
from defenses.evaluation.benchmark import benchmark  # noqa: E402
from defenses.attacks.detector_training import TRAIN_ATTACKS, craft, detection_attack  # noqa: E402
from defenses.saliency.detector_net import (DetectorCNN, batched, detector_input,  # noqa: E402
                                           detector_pass, input_channels)
from defenses.saliency_detector import DETECTORS, SaliencyDetector  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, complain, device_of  # noqa: E402

EPS = 0.3
FPR = 0.05
SPEC = {"dataset": "mnist5k", "model": "small_cnn", "epochs": 3, "train_samples": 2000,
        "eval_samples": 500, "batch_size": 100,
        "threat_model": {"eps": EPS, "attacks": ["fgsm", "pgd-20"], "train_steps": 5},
        "defenses": ["saliency_detector"]}
HOLDOUT = SaliencyDetector.holdout_size   # as in a trial: the first 200 training images
N_POOL = 600          # matrix: detector training images (clean + their adversarial versions)
N_TEST = 300          # matrix: test images per attack
N_JSMA = 100          # JSMA runs one image at a time (≈ 1 s each): fewer test images
MATRIX_EPOCHS = 10    # matrix: passes over the detector's training set
N_EVAL = 200          # robust accuracy: test images
DEF_EPOCHS = 3        # robust accuracy: trial epochs of the defense (2 passes each)
TEST_ATTACKS = TRAIN_ATTACKS + ("jsma",)
ROBUST_CONFIGS = [(k, False) for k in DETECTORS] + [("spd", True), ("smd", True)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup_base(out: Path, device: torch.device):
    from orchestrator.training import ensure_base
    from orchestrator.spec import parse
    from defenses.core.base import BaseModelRequest

    spec = parse(SPEC)
    base = ensure_base(spec, BaseModelRequest("standard"), out / "run", device)
    # as in a trial: the validation split (the threshold's images) is the last of the seeded
    # order, the classifier trained on the first 2000
    data = data_lib.hold_out_validation(data_lib.load("mnist5k", seed=spec.seed), spec.validation_samples)
    data = data.to(device)
    train = dataclasses.replace(data, train_x=data.train_x[HOLDOUT:2000], train_y=data.train_y[HOLDOUT:2000])
    holdout = (data.train_x[:HOLDOUT], data.train_y[:HOLDOUT])
    return base, train, holdout


def make_defense(hp: dict, base: Path, train) -> SaliencyDetector:
    cls = SaliencyDetector
    model = models.build("small_cnn", 10, 1).to(train.train_x.device)  # on the data's device
    defense = cls(model, cls.make_params(hp), ThreatModel(eps=EPS))
    defense.setup(train, base)
    return defense


def cached_tensor(path: Path, build, device: torch.device):
    if path.is_file():
        return torch.load(path, map_location=device, weights_only=True)
    t = build()
    torch.save(t, path)
    return t


# --- 1. the cross-attack matrix ----------------------------------------------------------------

def adversarial_sets(out: Path, model, pool, test) -> dict[str, dict[str, torch.Tensor]]:
    sets: dict[str, dict[str, torch.Tensor]] = {}
    for name in TEST_ATTACKS:
        torch.manual_seed(0)
        attack = detection_attack(name, model, EPS)
        t0 = time.perf_counter()
        entry = {}
        if name != "jsma":
            entry["pool"] = cached_tensor(out / f"adv-{name}-pool.pt", lambda: craft(attack, *pool), pool[0].device)
        n = N_JSMA if name == "jsma" else N_TEST
        entry["test"] = cached_tensor(out / f"adv-{name}-test.pt", lambda: craft(attack, test[0][:n], test[1][:n]),
                                      test[0].device)
        sets[name] = entry
        log(f"adversarial sets {name}: {time.perf_counter() - t0:.0f}s")
    return sets


def fooled_mask(model, x, y, adv) -> torch.Tensor:
    with torch.no_grad():
        return (batched(model, x).argmax(1) == y) & (batched(model, adv).argmax(1) != y)


def perturbation_stats(x, adv, fooled) -> dict[str, float]:
    d = (adv - x)[fooled].flatten(1)
    if len(d) == 0:
        return {"linf": math.nan, "l2": math.nan}
    return {"linf": d.abs().amax(1).mean().item(), "l2": d.norm(dim=1).mean().item()}


def train_matrix_detector(kind: str, clean_in: torch.Tensor, adv_in: torch.Tensor) -> DetectorCNN:
    torch.manual_seed(0)
    net = DetectorCNN(input_channels(kind, 1), 28, 28).to(clean_in.device)
    net.fit_scaling(clean_in)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inputs = torch.cat([clean_in, adv_in])
    labels = torch.cat([torch.zeros(len(clean_in)), torch.ones(len(adv_in))]).to(clean_in.device)
    g = torch.Generator().manual_seed(0)
    for _ in range(MATRIX_EPOCHS):
        detector_pass(net, opt, inputs, labels, 100, g)
    return net.eval().requires_grad_(False)


def matrix(out: Path, base: Path, train) -> dict:
    path = out / "matrix.json"
    if path.is_file():
        return json.loads(path.read_text())
    spd = make_defense({"detector": "spd"}, base, train)   # trains / loads the cached masking model
    model, masker = spd.model, spd.masker
    pool = (spd.train_x[:N_POOL], spd.train_y[:N_POOL])
    data = data_lib.load("mnist5k").to(pool[0].device)
    test = (data.test_x[:N_TEST], data.test_y[:N_TEST])
    sets = adversarial_sets(out, model, pool, test)
    fooled = {name: {"pool": fooled_mask(model, *pool, s["pool"]) if "pool" in s else None,
                     "test": fooled_mask(model, test[0][:len(s["test"])], test[1][:len(s["test"])], s["test"])}
              for name, s in sets.items()}
    attacks_info = {name: {"success_test": fooled[name]["test"].float().mean().item(),
                           **perturbation_stats(test[0][:len(s["test"])], s["test"], fooled[name]["test"])}
                    for name, s in sets.items()}
    result = {"attacks": attacks_info, "detectors": {}}
    for kind in DETECTORS:
        t0 = time.perf_counter()
        with frozen_eval(model), torch.no_grad():
            feats = lambda x: batched(lambda b: detector_input(kind, model, masker, b), x)  # noqa: E731
            clean_pool, calib, clean_test = feats(pool[0]), feats(spd.calib_x), feats(test[0])
            adv_pool = {n: feats(s["pool"][fooled[n]["pool"]]) for n, s in sets.items() if "pool" in s}
            adv_test = {n: feats(s["test"]) for n, s in sets.items()}
        rows = {}
        for train_attack in TRAIN_ATTACKS:
            net = train_matrix_detector(kind, clean_pool, adv_pool[train_attack])
            with torch.no_grad():
                tau = threshold_at_fpr(net(calib), FPR)
                clean_scores = net(clean_test)
                row = {"test_fpr": (clean_scores > tau).float().mean().item(),
                       "n_train_adv": len(adv_pool[train_attack])}
                for name in TEST_ATTACKS:
                    scores = net(adv_test[name])[fooled[name]["test"]]
                    row[name] = {"detection_rate": (scores > tau).float().mean().item() if len(scores) else math.nan,
                                 "auroc": roc_auc(clean_scores, scores), "n": len(scores)}
            rows[train_attack] = row
        result["detectors"][kind] = rows
        log(f"matrix {kind}: {time.perf_counter() - t0:.0f}s")
    path.write_text(json.dumps(result, indent=1))
    return result


# --- 2. robust accuracy under the adaptive attacks ---------------------------------------------

def robust(out: Path, base: Path, train, holdout) -> dict:
    path = out / "robust.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    data = data_lib.load("mnist5k").to(train.train_x.device)
    x, y = data.test_x[:N_EVAL], data.test_y[:N_EVAL]
    if "classifier" not in results:
        model = make_defense({"detector": "id"}, base, train).model
        adv = pgd(model, x, y, EPS, 2.5 * EPS / 20, 20)
        with torch.no_grad():
            results["classifier"] = {"clean_acc": (model(x).argmax(1) == y).float().mean().item(),
                                     "pgd-20": (model(adv).argmax(1) == y).float().mean().item()}
    for kind, adv_train in ROBUST_CONFIGS:
        key = f"{kind}{'+adv_train' if adv_train else ''}"
        if key in results:
            continue
        t0 = time.perf_counter()
        defense = make_defense({"detector": kind, "train_attack": "fgsm", "adv_train": adv_train}, base, train)
        hold = (holdout[0].float(), holdout[1])
        for epoch in range(1, DEF_EPOCHS + 1):
            train_metrics = defense.train_epoch([], None, epoch)
            end = defense.end_epoch(epoch, hold)
        t_train = time.perf_counter() - t0
        torch.manual_seed(0)
        res = benchmark(defense, x, y, EPS, ["fgsm", "pgd-20"], batch_size=100)
        results[key] = {"clean_acc": res.clean_acc, "clean_rejected": res.clean_rejected,
                        "robust_acc": res.robust_acc, "acc": res.acc, "broken_by": res.broken_by,
                        "train_seconds": t_train, "eval_seconds": res.seconds,
                        "train": train_metrics, "holdout": end}
        log(f"robust {key}: clean {res.clean_acc:.3f} robust {res.robust_acc:.3f} {res.acc} "
            f"train {t_train:.0f}s eval {res.seconds:.0f}s")
        path.write_text(json.dumps(results, indent=1))
    return results


# --- markdown ----------------------------------------------------------------------------------

def pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}"


def matrix_markdown(m: dict) -> str:
    lines = ["### Attacks (on the 300 test images; JSMA on 100)", "",
             "| attack | success rate | mean L∞ of successful | mean L2 of successful |",
             "|---|---|---|---|"]
    for name, a in m["attacks"].items():
        lines.append(f"| {name} | {pct(a['success_test'])} % | {a['linf']:.3f} | {a['l2']:.2f} |")
    lines += ["", "### Cross-attack detection matrix", "",
              "Cell = detection rate % at the 5 %-FPR threshold / AUROC %, over the successful "
              "adversarial test examples; rows = training attack, columns = test attack. "
              "`FPR` = measured clean test FPR of that detector.", ""]
    cols = list(TEST_ATTACKS)
    for kind, rows in m["detectors"].items():
        lines += [f"**{kind.upper()}**", "", "| trained on | FPR | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for train_attack, row in rows.items():
            cells = [f"{pct(row[c]['detection_rate'])} / {pct(row[c]['auroc'])}" for c in cols]
            lines.append(f"| {train_attack} | {pct(row['test_fpr'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Mean over the matrix** (all train × test cells; off-diagonal = cells whose test "
              "attack differs from the training attack)", "",
              "| detector | mean DR | mean AUROC | off-diagonal DR | off-diagonal AUROC |", "|---|---|---|---|---|"]
    for kind, rows in m["detectors"].items():
        cells = [(t, c, rows[t][c]) for t in rows for c in cols]

        def mean(vals):
            vals = [v for v in vals if not math.isnan(v)]
            return sum(vals) / len(vals) if vals else math.nan
        dr = mean([v["detection_rate"] for _, _, v in cells])
        au = mean([v["auroc"] for _, _, v in cells])
        odr = mean([v["detection_rate"] for t, c, v in cells if t != c])
        oau = mean([v["auroc"] for t, c, v in cells if t != c])
        lines.append(f"| {kind.upper()} | {pct(dr)} | {pct(au)} | {pct(odr)} | {pct(oau)} |")
    return "\n".join(lines)


def robust_markdown(r: dict) -> str:
    stages = None
    for key, v in r.items():
        if key != "classifier":
            stages = list(v["acc"])
            break
    lines = ["### Robust accuracy (ε = 0.3, 200 test images, benchmark cascade)", "",
             "Each column is the robust accuracy after that attack *and every one to its left* "
             "(an adversarial input counts as defended if rejected or still correctly classified; a "
             "rejected clean input counts as an error). `fgsm` and `pgd-20` attack the classifier "
             "alone (detector-unaware); `alt_whitebox-T` is the paper's alternating white-box "
             "attack (T rounds), `cw_extra-SxB` C&W-L2 inside the ε-ball with the detector as "
             "class K+1 (S Adam steps × B binary-search steps on c), `opgd-N` orthogonal PGD "
             "(N steps; `defenses/attacks/detector_aware.py`).",
             "", "| detector | clean acc (OSPA) | clean rejected | " + " | ".join(stages or []) + " | train s | eval s |",
             "|---|---|---|" + "---|" * (len(stages or []) + 2)]
    c = r["classifier"]
    lines.append(f"| classifier alone | {pct(c['clean_acc'])} | 0 | – | {pct(c['pgd-20'])} |"
                 + " – |" * (len(stages or []) - 2) + " – | – |")
    for key, v in r.items():
        if key == "classifier":
            continue
        accs = " | ".join(pct(v["acc"][s]) for s in stages)
        lines.append(f"| {key.upper()} | {pct(v['clean_acc'])} | {pct(v['clean_rejected'])} | {accs} | "
                     f"{v['train_seconds']:.0f} | {v['eval_seconds']:.0f} |")
    return "\n".join(lines)


START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.is_file() else f"# Model-based saliency detectors\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    doc.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/saliency_detector_exp"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "saliency_detector.md")
    parser.add_argument("--skip-robust", action="store_true", help="only the detection matrix")
    add_device_options(parser, threads=1)
    args = parser.parse_args()
    try:
        device = device_of(args)
    except BadInput as e:
        sys.exit(complain(parser.prog, str(e)))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, train, holdout = setup_base(args.out, device)
    m = matrix(args.out, base, train)
    body = matrix_markdown(m)
    if not args.skip_robust:
        body += "\n\n" + robust_markdown(robust(args.out, base, train, holdout))
    (args.out / "results.md").write_text(body)
    write_doc(args.doc, body)
    log(f"done in {time.perf_counter() - t0:.0f}s; tables in {args.doc}")


if __name__ == "__main__":
    main()
