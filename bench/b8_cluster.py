"""B8: a simulated large cluster — slot use and makespan of one Tune run for every defense
(``DefenseRouter``, today's design, with each ``start_order``) against one Tune run per
defense in sequence (the design before it), on the same trials.

The real search code (``make_router``: every defense's Optuna study, Tune's controller and
actor reuse) runs on a local Ray that declares ``slots`` logical CPUs; each trial holds one
and sleeps for a duration recorded in a real run of the default preset (``DURATIONS``:
train + evaluation seconds per trial and defense, CPU, 2026-12-02), scaled so the mean trial
lasts ``mean_s`` seconds. 16 trials per defense: each sleeps one of its defense's recorded
durations times a jitter in [0.8, 1.2], both picked by a hash of its configuration (random
search draws the same configurations in both designs, so both sleep the same).

The joint designs: ``start_order: interleaved`` (the default), ``longest_first`` learning
each defense's trial seconds as the sweep goes, and ``longest_first`` with ``cost_prior``:
the recorded run's seconds per defense (scaled as the sleeps are), given as the trials.csv
an earlier run leaves.

Slots busy = Σ trial sleep seconds / (slots × makespan); makespan = the wall time of the
design's ``fit`` calls, Tune's own overheads included. On 2 real cores the start of the trial
processes (each imports Ray Tune, about a second of CPU) takes most of a minute for 52 slots,
where a cluster's nodes start their own at once; so beside it, per trial process (``Run``):
how long until every process had started, Tune's turnaround between two trials of a process, the slots busy
counted from each slot's first trial, and the makespan had every process started at once
(each slot's measured trials and gaps from 0). And the makespan the same trials
would take with no overhead at all (list-scheduled in the order they started): how much of a
miss is this machine and Tune, and how much the trials themselves (a few long trials in the
last wave leave slots idle whatever runs them). ``simulate`` runs the router itself on a
clock with no overhead at all, over many draws of the durations."""
from __future__ import annotations

import heapq
import json
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ray.tune.search import Searcher

from bench.common import load_line, section, table

ROOT = Path(__file__).resolve().parent.parent
# train_seconds + eval_seconds per trial of the default preset's search
# (python orchestrator/sweep.py --out RUN --final-eval none; 2 trials per defense)
DURATIONS = json.loads((Path(__file__).with_name("b8_durations.json")).read_text())
# full: 52 slots, where the no-overhead simulation of the router with a cost prior meets both
# targets (``python -m bench.b8_cluster --orders``: from 52 to 56 slots; at 48 the makespan
# ratio is under 4x, from 60 on the last wave leaves more than 15 % of the slots idle); trials
# of 40 s on average, so that this machine's start of 52 trial processes on 2 cores (about a
# second each) is not most of the makespan
SETTINGS = {"tiny": dict(slots=8, trials=2, mean_s=0.5, defenses=3),
            "quick": dict(slots=32, trials=16, mean_s=8.0, defenses=10),
            "full": dict(slots=52, trials=16, mean_s=40.0, defenses=10)}
# the joint run's start orders: (spec keys, label)
ORDERS = (({"start_order": "interleaved"}, "joint, interleaved"),
          ({"start_order": "longest_first"}, "joint, longest_first"),
          ({"start_order": "longest_first", "cost_prior": "PRIOR"}, "joint, longest_first + cost_prior"))


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
    # the process: Tune reuses a trial's actor for the next trial, so a pid is one slot's
    tune.report({"clean_acc": u, "robust_acc": 1 - u, "slept": time.time() - t0, "t0": t0,
                 "pid": os.getpid()})


def spec_for(defenses: list[str], trials: int, **order):
    from orchestrator.spec import parse

    return parse({"name": "b8", "search": "random", **order,
                  "defenses": {d: {"trials": trials} for d in defenses}})


def write_prior(folder: Path, defenses: list[str], scale: float) -> Path:
    """The recorded run as the trials.csv an earlier run leaves: one completed trial per
    recorded duration (scaled), so ``cost_prior`` reads each defense's mean."""
    import pandas as pd

    from orchestrator.records import iso_utc

    rows = [{"trial_id": f"{d}-{i}", "defense": d, "status": "completed", "started_at": iso_utc(0),
             "finished_at": iso_utc(x * scale)} for d in defenses for i, x in enumerate(DURATIONS[d])]
    pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
    return folder / "trials.csv"


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of ``durations`` started in this order, each on the first slot free, with no
    overhead at all: what a design could reach if Tune, Ray and the machine cost nothing."""
    free = [0.0] * slots  # a heap of the times each slot frees up
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


@dataclass
class Run:
    """One Tune run as measured: each trial's (start, seconds slept, process), starts in
    seconds after ``fit`` began, in the order they started; and the run's wall seconds."""
    trials: list[tuple[float, float, int]]
    wall: float

    @property
    def slept(self) -> list[float]:
        return [d for _, d, _ in self.trials]

    def fill(self) -> float:
        """Until the last trial process started its first trial: the processes starting."""
        return max(c[0][0] for c in self.chains().values())

    def chains(self) -> dict[int, list[tuple[float, float]]]:
        """Each process's trials, (start, end), in order: one slot's life."""
        out: dict[int, list[tuple[float, float]]] = {}
        for start, slept, pid in self.trials:
            out.setdefault(pid, []).append((start, start + slept))
        return out

    def up_seconds(self, slots: int) -> float:
        """Slot-seconds from each slot's first trial to the run's end; a slot the run never
        used counts from ``fill`` on (it was idle for want of trials)."""
        used = [trials[0][0] for trials in self.chains().values()]
        return sum(self.wall - t for t in used) + (slots - len(used)) * (self.wall - self.fill())

    def gaps(self) -> list[float]:
        """Seconds from a trial's end to the next trial's start in the same process: Tune's
        turnaround (the result, the searcher's tell and ask, the actor's reset)."""
        return [b[0] - a[1] for c in self.chains().values() for a, b in zip(c, c[1:])]

    def started_together(self) -> float:
        """The run's makespan had every trial process started at once (as a cluster's nodes
        start their own): each slot's trials and gaps as measured, from 0."""
        return max(c[-1][1] - c[0][0] for c in self.chains().values())


def fit(spec, out: Path, scale: float, name: str, slots: int) -> Run:
    """One Tune run of ``spec``'s trials, as the sweep starts it."""
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
    wall = time.time() - start
    return Run([(m["t0"] - start, m["slept"], m["pid"]) for m in results], wall)


def run(mode: str) -> str:
    import statistics

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
            prior = str(write_prior(Path(tmp), defenses, scale))
            measured, at_once, bounds = {}, {}, {}
            for i, (order, label) in enumerate((({}, "sequential"),) + ORDERS):
                order = {k: prior if v == "PRIOR" else v for k, v in order.items()}
                out = Path(tmp) / f"design{i}"
                out.mkdir()
                t0 = time.perf_counter()
                runs = [fit(spec_for([d], cfg["trials"]), out, scale, d, cfg["slots"]) for d in defenses] \
                    if label == "sequential" else \
                    [fit(spec_for(defenses, cfg["trials"], **order), out, scale, "joint", cfg["slots"])]
                wall = time.perf_counter() - t0
                slept = sum(x for r in runs for x in r.slept)
                together = sum(r.started_together() for r in runs)
                # the same trials in the same order, with no overhead (per Tune run, summed)
                ideal = sum(list_schedule(r.slept, cfg["slots"]) for r in runs)
                measured[label], at_once[label], bounds[label] = wall, together, ideal
                gaps = [g for r in runs for g in r.gaps()]
                rows.append([label, len(runs), sum(len(r.trials) for r in runs), f"{slept:.0f}",
                             f"{wall:.1f}", f"{measured['sequential'] / wall:.2f}×",
                             f"{100 * slept / cfg['slots'] / wall:.0f} %",
                             f"{sum(r.fill() for r in runs):.1f}",
                             f"{statistics.mean(gaps):.3f} ({len(gaps)})" if gaps else "—",
                             f"{100 * slept / sum(r.up_seconds(cfg['slots']) for r in runs):.0f} %",
                             f"{together:.1f} ({at_once['sequential'] / together:.2f}×, "
                             f"{100 * slept / cfg['slots'] / together:.0f} % busy)",
                             f"{ideal:.1f} ({bounds['sequential'] / ideal:.2f}×, "
                             f"{100 * slept / cfg['slots'] / ideal:.0f} % busy)"])
    finally:
        ray.shutdown()
    body = (f"{len(defenses)} defenses × {cfg['trials']} trials on {cfg['slots']} logical slots "
            f"(1 per trial); trial durations from a real default-preset run, scaled to a mean of "
            f"{cfg['mean_s']:g} s. Targets: ≥ 85 % of slots busy (joint), ≥ 4× shorter makespan.\n\n"
            + table(["design", "Tune runs", "trials", "Σ trial s", "makespan s",
                     "makespan sequential / this", "slots busy",
                     "until every trial process had started s", "Tune's turnaround: s from a trial's end to the next start in its process (restarts)",
                     "slots busy from each slot's first trial",
                     "trial processes started at once: makespan s (sequential / this, slots busy)",
                     "with no overhead: makespan s (sequential / this, slots busy)"], rows))
    return section(f"B8 a simulated large cluster (mode {mode})",
                   f"python bench/run.py --only b8{'' if mode == 'full' else ' --' + mode}", body, started)


class _Numbered(Searcher):
    """A searcher that only numbers its suggestions: ``simulate`` needs the router's choice
    of defense, not configurations."""

    def __init__(self):
        super().__init__(metric=None, mode=None)
        self.n = 0

    def suggest(self, trial_id: str) -> dict:
        self.n += 1
        return {"hp": {"n": self.n}}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass


def simulate(slots: int, order: str, draws: int = 200, trials: int = 16,
             defenses: int = 10) -> tuple[float, float]:
    """With no overhead at all: the joint design's makespan speed-up over sequential and its
    share of slots busy, means over ``draws`` random draws of B8's trial durations. ``order``:
    ``interleaved`` and ``longest_first`` (the router itself, ``DefenseRouter``, on a clock
    that jumps from one trial's end to the next), ``cost_prior`` (``longest_first`` told each
    defense's recorded mean duration, as ``cost_prior`` tells it), ``longest trial first``
    (every trial's duration known in advance; no searcher can know it)."""
    import random
    import statistics

    from orchestrator.tune_adapter import DefenseRouter

    names = sorted(DURATIONS)[:defenses]
    speedups, busy = [], []
    for draw in range(draws):
        rng = random.Random(draw)
        sec = {d: [rng.choice(DURATIONS[d]) * (0.8 + 0.4 * rng.random()) for _ in range(trials)]
               for d in names}
        total = sum(map(sum, sec.values()))
        sequential = sum(list_schedule(sec[d], slots) for d in names)
        if order == "longest trial first":
            makespan = list_schedule(sorted((x for v in sec.values() for x in v), reverse=True), slots)
        else:
            clock = [0.0]
            router = DefenseRouter({d: _Numbered() for d in names}, {d: trials for d in names},
                                   longest_first=order != "interleaved", clock=lambda: clock[0],
                                   prior={d: statistics.mean(DURATIONS[d]) for d in names}
                                   if order == "cost_prior" else None)
            ends: list[tuple[float, str]] = []  # a heap of (end, trial id)
            n = 0
            while True:
                while len(ends) < slots and (config := router.suggest(f"t{n}")) not in (None, Searcher.FINISHED):
                    d = config["defense"]
                    heapq.heappush(ends, (clock[0] + sec[d][config["hp"]["n"] - 1], f"t{n}"))
                    n += 1
                if not ends:
                    break
                clock[0], done = heapq.heappop(ends)
                router.on_trial_complete(done, {"clean_acc": 0.5, "robust_acc": 0.5})
            makespan = clock[0]
        speedups.append(sequential / makespan)
        busy.append(total / slots / makespan)
    return statistics.mean(speedups), statistics.mean(busy)


SIMULATED = ("interleaved", "longest_first", "cost_prior", "longest trial first")


if __name__ == "__main__":  # python -m bench.b8_cluster [--orders]: the quick run, or the bound table
    import sys

    if "--orders" in sys.argv:
        rows = [[f"{slots}", order, *(lambda r: (f"{r[0]:.2f}×", f"{100 * r[1]:.0f} %"))(simulate(slots, order))]
                for slots in (32, 48, 52, 56, 60, 64) for order in SIMULATED]
        print(table(["slots", "joint run's start order", "makespan sequential / joint", "slots busy"], rows))
    else:
        print(run("quick"))
