"""Shared helpers: interleaved timing, medians with spread, markdown tables, the machine line.

Timings on a shared machine drift with other people's load, so variants are always run in turn
(A B C A B C ...) and summarized by their median with the min-max spread; ratios are taken from
medians measured in the same loop, never across runs."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

MODES = ("tiny", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Stats:
    median: float
    low: float
    high: float
    n: int

    def fmt(self, unit: str = "s", scale: float = 1.0) -> str:
        return (f"{self.median * scale:.3g} {unit} ({self.low * scale:.3g}–{self.high * scale:.3g}, "
                f"n={self.n})")


def stats(xs: Sequence[float]) -> Stats:
    return Stats(statistics.median(xs), min(xs), max(xs), len(xs))


def interleave(variants: dict[str, Callable[[], object]], reps: int,
               warmup: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Seconds of each call, ``reps`` rounds of every variant in turn, after one untimed call of
    each name in ``warmup`` (default: all) so that lazy init and allocator growth are not timed."""
    for name in (variants if warmup is None else warmup):
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(num: Sequence[float], den: Sequence[float]) -> Stats:
    """Ratio of medians, with the spread of the per-round ratios (rounds are paired in time)."""
    per_round = [a / b for a, b in zip(num, den)]
    return Stats(statistics.median(num) / statistics.median(den), min(per_round),
                 max(per_round), len(per_round))


def fmt_ratio(r: Stats) -> str:
    return f"{r.median:.2f}× ({r.low:.2f}–{r.high:.2f})"


def sweep_cli(spec: dict, tmp: Path, name: str) -> tuple[float, pd.DataFrame]:
    """Run ``spec`` through the sweep CLI in a fresh process (``--no-dashboard --address
    local``); its wall seconds and trials.csv."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parent.parent
    spec_file, out = tmp / f"{name}.yaml", tmp / name
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(root / "orchestrator" / "sweep.py"), "--spec", str(spec_file),
                           "--out", str(out), "--no-dashboard", "--address", "local"],
                          cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, pd.read_csv(out / "trials.csv", dtype={"trial_id": str})


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on "
            f"{os.cpu_count()} cores")


def machine_line() -> str:
    import torch

    return (f"{platform.machine()} {platform.processor() or platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, command: str, body: str, started_load: str) -> str:
    """One benchmark's markdown: title, command, load before and after, then its tables."""
    return (f"### {title}\n\n`{command}` — {machine_line()}; {started_load} at start, "
            f"{load_line()} at end; taken {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
            f"{body}\n")
