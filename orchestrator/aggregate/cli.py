"""``python -m orchestrator.aggregate RUN_DIR [RUN_DIR ...] [--out DIR] [--exclude-flagged]``:
merge sweep runs and write trials.csv, pareto.csv (each also .parquet), pareto_by_eps.csv and
pareto.png."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from orchestrator.aggregate import (DEFAULT_OBJECTIVES, flagged_mask, front_summary, fronts_by_eps,
                                    knee, merge_runs, pareto_front)
from orchestrator.cli import EXIT_EXPORT_FAILED, BadInput, OneLineParser, complain
from orchestrator.export import export_all
from orchestrator.outdir import overwrite_problem, write_failure
from orchestrator.records import COMPLETED, objectives_problem

PROG = "aggregate"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m orchestrator.aggregate",
                       description="Merge sweep runs and write trials.csv, pareto.csv, "
                                   "pareto_by_eps.csv (when trials have a robustness curve) and "
                                   "pareto.png.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directory holding records/*.json")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: the run dir; required with several)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace the CSVs/plot already in it (without --out, a run "
                        "dir's own exports are always rewritten)")
    p.add_argument("--objectives", type=_objective_list, default=None,
                   help="comma-separated objectives of the fronts, e.g. clean_acc,robust_acc,cost "
                        "(default: those of the first run's spec.json, else clean_acc,robust_acc)")
    p.add_argument("--exclude-flagged", action="store_true",
                   help="leave trials with any flag.* raised (e.g. gradient masking) off the "
                        "Pareto fronts; trials.csv keeps them")
    return p


def _objective_list(text: str) -> tuple[str, ...]:
    """``--objectives``, checked as a spec's ``objectives`` are (known, ≥ 2, each once)."""
    objectives = [o.strip() for o in text.split(",") if o.strip()]
    if (problem := objectives_problem(objectives)):
        raise argparse.ArgumentTypeError(problem)
    return tuple(objectives)


def run_objectives(run_dir: Path) -> tuple[str, ...]:
    """The objectives the sweep in ``run_dir`` optimized (its spec.json), else the default."""
    try:
        objectives = json.loads((run_dir / "spec.json").read_text()).get("objectives")
    except (OSError, ValueError):
        objectives = None
    return tuple(objectives) if objectives else DEFAULT_OBJECTIVES


EXPORTS = ("trials.csv", "pareto.csv", "trials.parquet", "pareto.parquet", "pareto_by_eps.csv",
           "pareto.png")  # what export_all writes


def _input_problem(run_dirs: list[Path], out: Path | None, force: bool = False) -> str | None:
    """First thing wrong with the arguments, phrased with its fix; None when all is well."""
    for d in run_dirs:
        if not d.is_dir():
            return f"run dir {d} does not exist; pass the directory a sweep wrote"
        if not (d / "records").is_dir():
            return f"run dir {d} has no records/ folder; pass the directory a sweep wrote"
    if out is None and len(run_dirs) > 1:
        return f"{len(run_dirs)} run dirs given but no --out; add --out DIR for the merged output"
    if out is not None and out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a directory; choose another --out"
    if out is not None and all(out.resolve() != d.resolve() for d in run_dirs):
        problem = overwrite_problem([out / name for name in EXPORTS], force)
        if problem:
            return f"--out: {problem}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except BadInput as e:
        return complain(PROG, str(e))
    problem = _input_problem(args.run_dirs, args.out, args.force)
    if problem:
        return complain(PROG, problem)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or args.run_dirs[0]
    objectives = args.objectives or run_objectives(args.run_dirs[0])
    df = merge_runs(args.run_dirs)
    try:
        paths = export_all(df, out, objectives, exclude_flagged=args.exclude_flagged)
    except OSError as e:  # disk full, read-only folder: what was there stays as it was
        complain(PROG, write_failure(out, e))
        return EXIT_EXPORT_FAILED
    summary = front_summary(df, objectives, args.exclude_flagged)
    completed = int((df["status"] == COMPLETED).sum()) if not df.empty else 0
    print(f"{len(df)} trials ({completed} completed), {summary['size']} on the Pareto front "
          f"({', '.join(objectives)}), hypervolume {summary['hypervolume']:.4f}")
    flagged = int(flagged_mask(df).sum()) if not df.empty else 0
    if flagged:
        print(f"{flagged} trials flagged as suspect (see the 'suspect' column)"
              + ("; kept off the fronts" if args.exclude_flagged else ""))
    for eps, (objs, eps_front) in fronts_by_eps(df, objectives, args.exclude_flagged).items():
        print(f"ε={eps:.4g}: {len(eps_front)} on the front, hypervolume "
              f"{front_summary(df, objs, args.exclude_flagged)['hypervolume']:.4f}")
    front = pareto_front(df, objectives, args.exclude_flagged) if not df.empty else df
    if not front.empty:
        k = front.loc[knee(front, objectives)]  # by label: merged runs may repeat a trial_id
        print(f"knee: {k['trial_id']} ({k['defense']}) "
              + " ".join(f"{o}={k[o]:.4f}" for o in objectives))
    for path in paths.values():
        print(f"wrote {path}")
    return 0
