"""Run the benchmarks and rewrite their sections of BENCHMARKS.md.

    python bench/run.py [--quick | --tiny] [--only b1,b5] [--md BENCHMARKS.md] [--no-write]
                        [--device cpu|cuda|cuda:N] [--threads 1]

Each benchmark writes the block between ``<!-- bench:bN -->`` and ``<!-- /bench:bN -->`` in
the markdown file (appended if the markers are missing); the rest of the file is left alone."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from defenses.core.cache import atomic_write  # noqa: E402
from orchestrator.cli import BadInput, add_device_options, complain, device_of  # noqa: E402

BENCHMARKS = {"b1": "bench.b1_step", "b2": "bench.b2_attacks", "b3": "bench.b3_overhead",
              "b4": "bench.b4_search", "b4sat": "bench.b4_sat", "b5": "bench.b5_aggregate",
              "b7": "bench.b7_early_stopping", "b8": "bench.b8_cluster"}
ON_DEVICE = ("b1", "b2")  # the benchmarks that run models in this process (the rest drive sweeps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced settings (≤ 5 min on 2 cores)")
    size.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds; numbers meaningless)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ",".join(BENCHMARKS))
    p.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to rewrite")
    p.add_argument("--no-write", action="store_true", help="print only")
    add_device_options(p, threads=1)
    args = p.parse_args(argv)
    unknown = [b for b in args.only.split(",") if b not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)}")
    return args


def rewrite(md: Path, key: str, body: str) -> None:
    """Replace the block of ``key`` in ``md`` (atomically), or append it."""
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"<!-- bench:{key} -->\n{body.rstrip()}\n<!-- /bench:{key} -->"
    pattern = re.compile(rf"<!-- bench:{key} -->.*?<!-- /bench:{key} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write(md, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = device_of(args)
    except BadInput as e:
        return complain("bench/run.py", str(e))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    for key in args.only.split(","):
        t0 = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[key])
        body = module.run(mode, device) if key in ON_DEVICE else module.run(mode)
        print(body, flush=True)
        print(f"[{key} took {time.perf_counter() - t0:.0f} s]", flush=True)
        if not args.no_write:
            rewrite(Path(args.md), key, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
