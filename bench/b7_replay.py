"""B7 replayed: the early-stopping rule run on recorded learning curves, over many arrival orders.

One B7 run says how ``mo_asha`` did for one order in which 32 trials reached its rungs; on 2
slots that order decides much (an asynchronous rung judges a trial against the ones recorded
before it). This script records, once, every epoch of 32 configurations trained to the end
(pgd_at and trades, 16 each, B7's full settings: 6 epochs on all of mnist5k's training split,
the per-epoch validation objectives that ``mo_asha`` ranks, the final search-time
evaluation, and the seconds of each), then replays the real scheduler (``MOASHA.decide``) on
a clock that runs those seconds on ``slots`` slots, for many random start orders. Each replay
gives what a B7 sweep would: the trial-seconds (Σ train + evaluation seconds, the per-epoch
validation counted only where a scheduler needs it) and the hypervolume of the finished
trials' front, both as ratios to no stopping (every trial finished, no validation).

    python -m bench.b7_replay record --out runs/b7-replay --seed 13   # ~50 min on 2 cores
    python -m bench.b7_replay reevaluate --out runs/b7-replay --images 1000   # ~18 min
    python -m bench.b7_replay replay --out runs/b7-replay [--images 1000]      # seconds
    python -m bench.b7_replay tune --out runs/b7-replay --grace 1 --factor 3   # ~15 min

``tune`` runs one ``mo_asha`` sweep of the recording's configurations for real (the sweep
CLI, as B7 does) and holds it against the recording's no-stopping numbers: training is
deterministic on the CPU, so the recording's final evaluations are the ones a no-stopping
sweep of the same seed reports (seed 11: hypervolume 0.4523 in both).

The recorded curves are the trials' own (LocalReporter, no Tune), so a replay costs nothing
but what it replays; it leaves out Tune's overheads, which B7 itself measures."""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import statistics
from pathlib import Path

import numpy as np

from bench.b7_early_stopping import SETTINGS, spec, trial_seconds
from bench.common import load_line, section, table

DEFENSES = ("pgd_at", "trades")


def configurations(sweep: dict, draw: str = "sweep") -> list[dict]:
    """``sweep``'s configurations, per defense its ``trials``: ``draw="sweep"``, the ones a B7
    sweep at this seed runs (each defense's own searcher, ``make_searcher``, asked in turn;
    random search draws the same whatever the order the trials end in); ``"uniform"``, drawn
    here from each search space (uniform, or log-uniform where the space says ``log``)."""
    import importlib
    import tempfile

    from orchestrator.spec import parse
    from orchestrator.tune_adapter import make_searcher

    rng, out = random.Random(sweep["seed"]), []
    for d in DEFENSES:
        n = sweep["defenses"][d]["trials"]
        if draw == "uniform":
            space = importlib.import_module(f"search_spaces.{d}").SPACE
            hps = [{k: math.exp(rng.uniform(math.log(v["low"]), math.log(v["high"]))) if v.get("log")
                    else rng.uniform(v["low"], v["high"]) for k, v in space.items()} for _ in range(n)]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                searcher = make_searcher(parse(sweep), d, Path(tmp))
                hps = [searcher.suggest(f"{d}-{i:02d}")["hp"] for i in range(n)]
        out += [{"defense": d, "hp": hp, "trial_id": f"{d}-{i:02d}", "draw": draw} for i, hp in enumerate(hps)]
    return out


def _one(job: tuple[dict, dict, str]) -> None:
    """Train and evaluate one configuration to its last epoch; write its curve as JSON."""
    from defenses.core.cache import atomic_write
    from orchestrator.trial import LocalReporter, run_trial

    config, sweep, folder = job
    target = Path(folder) / f"{config['trial_id']}.json"
    if target.exists():
        return
    reporter = LocalReporter(Path(folder) / "work" / config["trial_id"], config["trial_id"])
    record = run_trial({**config, "spec": sweep, "run_dir": str(Path(folder) / "work")}, reporter)
    epochs = [{k: r.get(k) for k in ("epoch", "train_seconds", "val_seconds", "val.clean_acc",
                                     "val.robust_acc", "val.cost")}
              for r in reporter.results if r.get("status") == "running"]
    curve = {**config, "seed": sweep["seed"], "epochs": epochs, "clean_acc": record.clean_acc,
             "robust_acc": record.robust_acc, "train_seconds": record.train_seconds,
             "eval_seconds": record.eval_seconds, "cost": record.cost, "status": record.status}
    # whole or absent: a recorder killed mid-write must not leave a file that counts as done
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(curve)))


def record(out: Path, seed: int, mode: str = "full", draw: str = "sweep", workers: int = 2) -> None:
    """Every configuration's curve under ``out`` (resumable: a finished one is not redone)."""
    cfg = SETTINGS[mode]
    # a scheduler other than none makes each trial compute the per-epoch validation objectives;
    # without Tune nothing stops it
    sweep = spec(cfg, "mo_asha", 1, 2, seed)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(c, sweep, str(out)) for c in configurations(sweep, draw)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_one, jobs):
            pass


def load(out: Path, images: int | None = None) -> list[dict]:
    """The recorded trials; a trial that failed (diverged) is left out, as no sweep keeps it.
    ``images``: take each trial's final evaluation on that many test images (``reevaluate``)
    instead of the recorded one; the seconds stay the recorded sweep's."""
    trials = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    trials = [t for t in trials if t["status"] == "completed"]
    if images is not None:
        missing = [t["trial_id"] for t in trials if str(images) not in t.get("final", {})]
        if missing:
            raise SystemExit(f"{out}: no evaluation on {images} images for {', '.join(missing)}; "
                             f"run: python -m bench.b7_replay reevaluate --out {out} --images {images}")
        trials = [{**t, **t["final"][str(images)]} for t in trials]
    return trials


def reevaluate(out: Path, images: int, mode: str = "full") -> None:
    """Each recorded trial's final model (its last checkpoint) evaluated again as the sweep
    evaluates it (the search-time cascade, ``_evaluate``), on the first ``images`` test
    images: the recorded evaluation's 200 images give each robust accuracy a 95 % interval of
    about ±7 pts, so a front of 32 trials is partly the evaluation's noise. Kept in each
    trial's JSON under ``final``; resumable."""
    import torch

    from defenses.core.cache import atomic_write
    from orchestrator.spec import parse
    from orchestrator.training import build_setup, load_checkpoint
    from orchestrator.trial import _evaluate

    recorded = SETTINGS[mode]["eval"]
    for path in sorted(out.glob("*.json")):
        t = json.loads(path.read_text())
        if t["status"] != "completed" or str(images) in t.get("final", {}):
            continue
        sweep = parse({**spec(SETTINGS[mode], "none", seed=t["seed"]), "eval_samples": images})
        s = build_setup(sweep, t["defense"], t["hp"], torch.device("cpu"), out / "work")
        load_checkpoint(out / "work" / t["trial_id"] / "checkpoint", s)
        r = _evaluate(s).primary
        t.setdefault("final", {})[str(images)] = {"clean_acc": r.clean_acc, "robust_acc": r.robust_acc,
                                                  "n": r.n, "robust_attack": r.robust_attack}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(t)))
        print(f"{t['trial_id']}: {r.clean_acc:.3f} / {r.robust_acc:.3f} on {r.n} images "
              f"(recorded on {recorded}: {t['clean_acc']:.3f} / {t['robust_acc']:.3f})", flush=True)


def _hv(points: list[tuple[float, float]]) -> float:
    from orchestrator.aggregate import points_hypervolume

    return points_hypervolume(np.array(points, float).reshape(-1, 2)) if points else 0.0


def replay(trials: list[dict], grace: int, factor: float, order: list[int], slots: int = 2,
           keep_nondominated: bool = True) -> tuple[float, float, int]:
    """One sweep on the recorded curves: trials start in ``order``, each on the first free
    slot; at each rung ``MOASHA.decide`` continues or stops it. Its trial-seconds, the
    hypervolume of its finished trials' front, and how many finished."""
    import heapq

    from orchestrator.mo_asha import MOASHA

    epochs = len(trials[0]["epochs"])
    sched = MOASHA(["val.clean_acc", "val.robust_acc"], max_t=epochs, grace_period=grace,
                   reduction_factor=factor, keep_nondominated=keep_nondominated)
    events: list[tuple[float, int, int]] = []  # (time, trial, epoch reached)
    queue = list(order)
    seconds, finished = 0.0, []

    def start(at: float) -> None:
        if queue:
            i = queue.pop(0)
            heapq.heappush(events, (at + _epoch_seconds(trials[i], 1), i, 1))

    for _ in range(slots):
        start(0.0)
    while events:
        now, i, e = heapq.heappop(events)
        t = trials[i]
        stop = False
        if e in sched.recorded:
            r = t["epochs"][e - 1]
            stop = sched.decide(t["trial_id"], e, [r["val.clean_acc"], r["val.robust_acc"]]) == "STOP"
        if stop or e == epochs:
            seconds += _spent(t, e) if stop else t["train_seconds"] + t["eval_seconds"]
            if not stop:
                finished.append((t["clean_acc"], t["robust_acc"]))
            start(now if stop else now + _final_evaluation_seconds(t))
        else:
            heapq.heappush(events, (now + _epoch_seconds(t, e + 1), i, e + 1))
    return seconds, _hv(finished), len(finished)


def _epoch_seconds(t: dict, e: int) -> float:
    return _spent(t, e) - (_spent(t, e - 1) if e > 1 else 0.0)


def _spent(t: dict, e: int) -> float:
    """Train and validation seconds up to the end of epoch ``e``."""
    r = t["epochs"][e - 1]
    return r["train_seconds"] + r["val_seconds"]


def _final_evaluation_seconds(t: dict) -> float:
    """The search-time evaluation alone (the record's eval_seconds hold the validation too)."""
    return t["eval_seconds"] - t["epochs"][-1]["val_seconds"]


def unstopped(trials: list[dict]) -> tuple[float, float]:
    """No stopping: every trial finished, no per-epoch validation."""
    seconds = sum(t["train_seconds"] + _final_evaluation_seconds(t) for t in trials)
    return seconds, _hv([(t["clean_acc"], t["robust_acc"]) for t in trials])


# (grace_period, reduction_factor, keep_nondominated)
ARMS = tuple((g, r, keep) for keep in (False, True) for g, r in ((1, 3), (1, 2), (2, 2), (2, 3)))


def predictive(trials: list[dict]) -> str:
    """How well each epoch's validation objectives order the trials as their final test
    evaluation does: Spearman's rank correlation, per defense and over all trials. A rung can
    only keep the right trials where this is well above 0."""
    import pandas as pd

    groups = {d: [t for t in trials if t["defense"] == d] for d in DEFENSES} | {"all": trials}
    rows = []
    for e in range(len(trials[0]["epochs"])):
        row = [f"{e + 1}"]
        for group in groups.values():
            for val, final in (("val.clean_acc", "clean_acc"), ("val.robust_acc", "robust_acc")):
                now = pd.Series([t["epochs"][e][val] for t in group])
                row.append(f"{now.corr(pd.Series([t[final] for t in group]), method='spearman'):+.2f}")
        rows.append(row)
    return table(["epoch"] + [f"{g}: {o}" for g in groups for o in ("clean", "robust")], rows)


def report(trials: list[dict], orders: int = 200, arms=ARMS) -> str:
    s0, h0 = unstopped(trials)
    rows = []
    for grace, factor, keep in arms:
        if grace >= len(trials[0]["epochs"]):
            continue
        runs = [replay(trials, grace, factor, random.Random(k).sample(range(len(trials)), len(trials)),
                       keep_nondominated=keep) for k in range(orders)]
        sec = [s / s0 for s, _, _ in runs]
        hv = [h / h0 for _, h, _ in runs]
        met = sum(a <= 0.55 and b >= 0.95 for a, b in zip(sec, hv))
        rows.append([f"grace {grace}, factor {factor:g}", "kept" if keep else "stopped (the paper)",
                     f"{statistics.mean(sec):.2f}×",
                     f"{statistics.mean(hv):.3f}× ({np.percentile(hv, 10):.3f}–{np.percentile(hv, 90):.3f})",
                     f"{statistics.mean(n for *_, n in runs):.1f}", f"{100 * met / orders:.0f} %"])
    return table(["mo_asha", "a non-dominated trial outside the top share", "trial-seconds",
                  "hypervolume (10th–90th percentile)", "finished", "orders meeting both targets"], rows)


def replay_section(trials: list[dict], orders: int, images: int | None = None) -> str:
    """BENCHMARKS' section for one recording: the rank correlations and the replays;
    ``images``: the final evaluation taken (``reevaluate``), else the recorded one."""
    started = load_line()
    seed, draw = trials[0]["seed"], trials[0]["draw"]
    final = (f"the final search-time evaluation on {images} test images (`reevaluate --images {images}`: "
             "the recorded trials' last checkpoints)" if images else "the final search-time evaluation")
    body = (f"{len(trials)} configurations recorded with `python -m bench.b7_replay record --out DIR "
            f"--seed {seed}{'' if draw == 'sweep' else ' --draw ' + draw}` (B7's full settings; each "
            f"trained to its last epoch, every epoch validated). Spearman's rank correlation of each "
            f"epoch's validation objective with {final}:\n\n" + predictive(trials)
            + f"\n\n`mo_asha` replayed on these curves, 2 slots, {orders} random start orders; ratios "
            "to no stopping. Target: ≥ 95 % of the hypervolume with ≤ 55 % of the trial-seconds.\n\n"
            + report(trials, orders))
    title = f"B7 replayed on recorded learning curves (seed {seed}{f', {images} test images' if images else ''})"
    return section(title, f"python -m bench.b7_replay replay --out DIR --orders {orders}"
                   + (f" --images {images}" if images else ""), body, started)


def tune_arm(out: Path, grace: int, factor: float, mode: str = "full") -> str:
    """One real ``mo_asha`` sweep (the sweep CLI, in a fresh process) of the recording's
    seed; its trial-seconds and front hypervolume as ratios to the recording's no stopping."""
    import tempfile

    from bench.common import sweep_cli
    from orchestrator.aggregate import hypervolume, pareto_front

    trials = load(out)
    if trials[0]["draw"] != "sweep":
        raise SystemExit(f"{out} holds configurations drawn by this script: record with --draw sweep")
    s0, h0 = unstopped(trials)
    with tempfile.TemporaryDirectory() as tmp:
        wall, df = sweep_cli(spec(SETTINGS[mode], "mo_asha", grace, factor, trials[0]["seed"]),
                             Path(tmp), "mo_asha")
    seconds = trial_seconds(df)
    hv = float(hypervolume(pareto_front(df)))
    return (f"seed {trials[0]['seed']}, grace {grace}, factor {factor:g}: {len(df)} trials, "
            f"{int((df.status == 'stopped').sum())} stopped, {wall:.0f} s wall; trial-seconds "
            f"{seconds:.0f} ({seconds / s0:.2f}× the recording's {s0:.0f}), hypervolume {hv:.4f} "
            f"({hv / h0:.3f}× the recording's {h0:.4f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("record", "reevaluate", "replay", "tune"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--orders", type=int, default=200)
    p.add_argument("--grace", type=int, default=1, help="tune: mo_asha's grace_period")
    p.add_argument("--factor", type=float, default=3.0, help="tune: mo_asha's reduction_factor")
    p.add_argument("--mode", choices=list(SETTINGS), default="full",
                   help="B7's settings to record (tune: the recording's)")
    p.add_argument("--draw", choices=("sweep", "uniform"), default="sweep",
                   help="the configurations: the sweep's own random search, or drawn by this script")
    p.add_argument("--images", type=int, default=None,
                   help="reevaluate: on this many test images; replay: use that evaluation")
    a = p.parse_args()
    if a.what == "record":
        record(a.out, a.seed, a.mode, a.draw)
    elif a.what == "reevaluate":
        reevaluate(a.out, a.images or 1000, a.mode)
    elif a.what == "tune":
        print(tune_arm(a.out, a.grace, a.factor, a.mode))
    else:
        print(replay_section(load(a.out, a.images), a.orders, a.images))
