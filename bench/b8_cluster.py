"""B8: a simulated large cluster — slot use and makespan of one Tune run for every defense
(``DefenseRouter``, today's design) against one Tune run per defense in sequence (the design
before it), on the same trials.

The real search code (``make_router``: every defense's Optuna study, Tune's controller and
actor reuse) runs on a local Ray that declares ``slots`` logical CPUs; each trial holds one
and sleeps for a duration recorded in a real run of the default preset (``DURATIONS``:
train + evaluation seconds per trial and defense, CPU, 2026-12-02), scaled so the mean trial
lasts ``mean_s`` seconds. 16 trials per defense: each sleeps one of its defense's recorded
durations times a jitter in [0.8, 1.2], both picked by a hash of its configuration (random
search draws the same configurations in both designs, so both sleep the same).

Slots busy = Σ trial sleep seconds / (slots × makespan); makespan = the wall time of the
design's ``fit`` calls, Tune's own overheads included. Beside it, the makespan the same trials
would take with no overhead at all (list-scheduled in the order they started), and started
longest first: how much of a miss is this machine and Tune, and how much the trials
themselves (a few long trials in the last wave leave slots idle whatever runs them)."""
from __future__ import annotations

import heapq
import json
import tempfile
import time
import zlib
from pathlib import Path

from bench.common import load_line, section, table

ROOT = Path(__file__).resolve().parent.parent
# train_seconds + eval_seconds per trial of the default preset's search
# (python orchestrator/sweep.py --out RUN --final-eval none; 2 trials per defense)
DURATIONS = json.loads((Path(__file__).with_name("b8_durations.json")).read_text())
SETTINGS = {"tiny": dict(slots=8, trials=2, mean_s=0.5, defenses=3),
            "quick": dict(slots=32, trials=16, mean_s=8.0, defenses=10),
            "full": dict(slots=64, trials=16, mean_s=15.0, defenses=10)}


def sleep_seconds(defense: str, hp: dict, scale: float) -> float:
    """A recorded duration of ``defense`` and a jitter, both picked by the configuration."""
    recorded = DURATIONS[defense]
    h = zlib.crc32(json.dumps(hp, sort_keys=True).encode())
    return recorded[h % len(recorded)] * (0.8 + 0.4 * (h // 7 % 1000) / 999) * scale


def sleeper(config: dict, scale: float) -> None:
    """A trial that only sleeps, then reports two objectives (the router's studies need them)."""
    from ray import tune

    t0 = time.time()
    time.sleep(sleep_seconds(config["defense"], config["hp"], scale))
    u = (zlib.crc32(json.dumps(config["hp"], sort_keys=True).encode()) % 1000) / 999
    tune.report({"clean_acc": u, "robust_acc": 1 - u, "slept": time.time() - t0, "t0": t0})


def spec_for(defenses: list[str], trials: int):
    from orchestrator.spec import parse

    return parse({"name": "b8", "search": "random",
                  "defenses": {d: {"trials": trials} for d in defenses}})


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of ``durations`` started in this order, each on the first slot free, with no
    overhead at all: what a design could reach if Tune, Ray and the machine cost nothing."""
    free = [0.0] * slots  # a heap of the times each slot frees up
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def fit(spec, out: Path, scale: float, name: str, slots: int) -> tuple[list[float], float]:
    """One Tune run of ``spec``'s trials, as the sweep starts it: the seconds each trial slept
    (in the order they started), and how long after ``fit`` began the first one started (the
    cluster filling up)."""
    from ray import tune

    from orchestrator.sweep import concurrent_trials
    from orchestrator.tune_adapter import make_router

    trainable = tune.with_resources(tune.with_parameters(sleeper, scale=scale), {"cpu": 1})
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        search_alg=make_router(spec, out), num_samples=spec.total_trials(), reuse_actors=True,
        max_concurrent_trials=concurrent_trials(spec, slots, 0)),
        run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=0))
    start = time.time()
    results = sorted((r.metrics for r in tuner.fit()), key=lambda m: m["t0"])
    return [m["slept"] for m in results], results[0]["t0"] - start


def run(mode: str) -> str:
    import ray

    cfg = SETTINGS[mode]
    started = load_line()
    defenses = sorted(DURATIONS)[: cfg["defenses"]]
    mean = sum(sum(v) for v in DURATIONS.values()) / sum(len(v) for v in DURATIONS.values())
    scale = cfg["mean_s"] / mean
    rows = []
    ray.init(num_cpus=cfg["slots"], include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            measured, bounds = {}, {}
            for design in ("sequential", "joint"):
                out = Path(tmp) / design
                out.mkdir()
                t0 = time.perf_counter()
                runs = [fit(spec_for(defenses, cfg["trials"]), out, scale, "joint", cfg["slots"])] \
                    if design == "joint" else \
                    [fit(spec_for([d], cfg["trials"]), out, scale, d, cfg["slots"]) for d in defenses]
                wall = time.perf_counter() - t0
                slept = [x for r, _ in runs for x in r]
                filling = sum(f for _, f in runs)
                measured[design] = wall
                busy = sum(slept) / cfg["slots"]
                # the same trials in the same order, with no overhead (per Tune run, summed)
                ideal = sum(list_schedule(r, cfg["slots"]) for r, _ in runs)
                bounds[design] = ideal
                rows.append([design, len(runs), len(slept), f"{sum(slept):.0f}", f"{wall:.1f}",
                             f"{filling:.1f}", f"{100 * busy / wall:.0f} %",
                             f"{100 * busy / (wall - filling):.0f} %",
                             f"{ideal:.1f} ({100 * busy / ideal:.0f} % busy)"])
            longest_first = list_schedule(sorted(slept, reverse=True), cfg["slots"])
    finally:
        ray.shutdown()
    speedup = measured["sequential"] / measured["joint"]
    body = (f"{len(defenses)} defenses × {cfg['trials']} trials on {cfg['slots']} logical slots "
            f"(1 per trial); trial durations from a real default-preset run, scaled to a mean of "
            f"{cfg['mean_s']:g} s. Targets: ≥ 85 % of slots busy (joint), ≥ 4× shorter makespan.\n\n"
            + table(["design", "Tune runs", "trials", "Σ trial s", "makespan s",
                     "until the first trial started s", "slots busy", "slots busy after the first start",
                     "makespan with no overhead s"], rows)
            + f"\n\nmakespan sequential / joint: **{speedup:.2f}×**; with no overhead at all "
            f"(the same trials, each design's start order, list-scheduled): "
            f"{bounds['sequential'] / bounds['joint']:.2f}×; joint, started longest first "
            f"(which needs every duration in advance): {bounds['sequential'] / longest_first:.2f}×, "
            f"{100 * sum(slept) / cfg['slots'] / longest_first:.0f} % busy")
    return section(f"B8 a simulated large cluster (mode {mode})",
                   f"python bench/run.py --only b8{'' if mode == 'full' else ' --' + mode}", body, started)


def start_orders(slots: int, draws: int = 200, trials: int = 16, defenses: int = 10) -> dict[str, tuple[float, float]]:
    """With no overhead at all: the joint design's makespan speed-up over sequential and its
    share of slots busy, means over ``draws`` random draws of B8's trial durations, for three
    start orders of the joint run: ``interleaved`` (one defense after another, as the router
    starts them under a fixed allocation), ``longest defense first`` (by each defense's
    recorded mean duration, a cost known per defense before the sweep) and ``longest trial
    first`` (every trial's duration known in advance; no searcher can know it)."""
    import random
    import statistics

    names = sorted(DURATIONS)[:defenses]
    prior = {d: statistics.mean(DURATIONS[d]) for d in names}
    out: dict[str, list[tuple[float, float]]] = {}
    for draw in range(draws):
        rng = random.Random(draw)
        sec = {d: [rng.choice(DURATIONS[d]) * (0.8 + 0.4 * rng.random()) for _ in range(trials)]
               for d in names}
        sequential = sum(list_schedule(sec[d], slots) for d in names)
        every = [x for d in names for x in sec[d]]
        for order, durations in (
                ("interleaved", [sec[d][i] for i in range(trials) for d in names]),
                ("longest defense first", [x for d in sorted(names, key=prior.get, reverse=True) for x in sec[d]]),
                ("longest trial first", sorted(every, reverse=True))):
            m = list_schedule(durations, slots)
            out.setdefault(order, []).append((sequential / m, sum(every) / slots / m))
    return {k: (statistics.mean(a for a, _ in v), statistics.mean(b for _, b in v)) for k, v in out.items()}


if __name__ == "__main__":  # python -m bench.b8_cluster [--orders]: the quick run, or the bound table
    import sys

    if "--orders" in sys.argv:
        rows = [[f"{slots}", order, f"{speedup:.2f}×", f"{100 * busy:.0f} %"]
                for slots in (32, 48, 64) for order, (speedup, busy) in start_orders(slots).items()]
        print(table(["slots", "joint run's start order", "makespan sequential / joint", "slots busy"], rows))
    else:
        print(run("quick"))
