"""Evaluate a trained trial again, with any attacks: ``python -m orchestrator.evaluate CHECKPOINT``.

    python -m orchestrator.evaluate runs/default/tune/sweep/<trial>/checkpoint_000003 \\
        --attacks standard --eps 0.1,0.2,0.3 --samples 500 [--json out.json]

CHECKPOINT is a trial checkpoint (the ``checkpoint.pt`` file or its folder) as ``run_trial``
writes it. The trial is rebuilt from it: the sweep spec comes from ``--spec`` or from the
``spec.json`` of the run directory above the checkpoint (its ``bases/`` hold the base models
the defense starts from, so nothing is retrained), the defense and its hyperparameters from
the checkpoint's ``meta``. Then ``defenses.evaluation.benchmark.evaluate`` runs: one cascade per ε and the
gradient-masking checks. Bad input (unknown attack or preset, ε outside [0,1], a threat model
the attacks do not support, a checkpoint that does not match the model/dataset) is one line on
stderr and exit code 2, before anything expensive runs.

``final_evaluation(run_dir, spec)`` is the sweep's final evaluation (``threat_model.final_eval``,
AutoAttack standard by default; ``--final-eval none`` opts out): every trial that could be on
a final front (the first two non-dominated layers at the primary ε and at every ε of the
curve, and any trial whose interval reaches a front) is re-evaluated on ``final_samples`` test
images, as Ray tasks with the trial's own resources, until no such trial is left with
search-time numbers. A re-evaluated record keeps its search-time robust accuracy in
``robust_acc_search`` and names the final cascade in ``final_attack``."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import yaml

from defenses.evaluation import benchmark as eval_lib
from defenses.core import registry
from defenses.core.base import DefenseConfigError
from defenses.core.data import DatasetError, as_float
from orchestrator.cli import BadInput, OneLineParser, complain
from orchestrator.aggregate import fronts_by_eps, front_layers, merge_runs, reaches_front
from orchestrator.outdir import overwrite_problem
from orchestrator.records import TrialRecord, load_records, save_record, write_json_atomic
from orchestrator.spec import SpecError, SweepSpec, parse
from orchestrator.training import (CHECKPOINT_FILE, NoGPU, TrialSetup, all_test_images, build_setup,
                                   choose_device, hold_gpu_share, load_checkpoint, release_gpu_memory,
                                   saved_broken)

log = logging.getLogger("orchestrator.evaluate")
SPEC_FILE = "spec.json"


class EvaluateError(BadInput):
    """Bad input: one line, exit code 2."""


# ---------------------------------------------------------------- checkpoint -> trial

def checkpoint_file(path: Path) -> Path:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise EvaluateError(f"checkpoint {str(path)!r} not found; pass a trial's {CHECKPOINT_FILE} "
                            "or the folder holding it")
    return file


def read_checkpoint(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise EvaluateError(f"checkpoint {str(file)!r} is unreadable ({type(e).__name__}); pass a "
                            "trial checkpoint written by run_trial") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "model" not in state \
            or not {"dataset", "model", "defense"} <= set(meta):
        raise EvaluateError(f"checkpoint {str(file)!r} is not a trial checkpoint (no model/meta "
                            "with dataset, model and defense); pass one written by run_trial")
    return state


def find_spec(file: Path, levels: int = 8) -> Path | None:
    """The ``spec.json`` of the run directory above a checkpoint, if any."""
    for parent in list(Path(file).resolve().parents)[:levels]:
        if (parent / SPEC_FILE).is_file():
            return parent / SPEC_FILE
    return None


def load_spec_file(path: Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"spec file {str(path)!r} not found")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        return parse(raw or {})
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluateError(f"spec file {str(path)!r}: {first}") from None


def spec_from_meta(meta: dict[str, Any]) -> SweepSpec:
    """A spec with the checkpoint's dataset, model, seed and defense and defaults elsewhere
    (threat model, optimizer: base models may differ from the trial's and are retrained)."""
    try:
        return parse({"dataset": meta["dataset"], "model": meta["model"],
                      "seed": int(meta.get("seed", 0)), "defenses": [meta["defense"]]})
    except SpecError as e:
        raise EvaluateError(f"checkpoint meta: {e}") from None


def check_match(meta: dict[str, Any], spec: SweepSpec, file: Path, dataset: str | None,
                model: str | None) -> None:
    """The checkpoint must be a model of the dataset/architecture the user and the spec name."""
    for key, want, where in (("dataset", dataset, "--dataset"), ("model", model, "--model"),
                             ("dataset", spec.dataset, "the spec"), ("model", spec.model, "the spec")):
        if want is not None and meta[key] != want:
            raise EvaluateError(f"checkpoint {str(file)!r} holds a {meta['model']!r} trained on "
                                f"{meta['dataset']!r}, but {where} says {key} {want!r}")
    if meta["defense"] not in registry.names():
        raise EvaluateError(f"checkpoint {str(file)!r} was trained by defense {meta['defense']!r}, "
                            f"which is not registered; registered: {', '.join(registry.names())}")


def restore(checkpoint: Path, spec: SweepSpec | None = None, run_dir: Path | None = None,
            device: torch.device | None = None, dataset: str | None = None,
            model: str | None = None) -> TrialSetup:
    """The trial of ``checkpoint``, rebuilt (data, model, defense, base models) and loaded."""
    file = checkpoint_file(checkpoint)
    meta = read_checkpoint(file)["meta"]
    found = find_spec(file)
    guessed = spec is None and found is None
    if spec is None:
        spec = load_spec_file(found) if found is not None else spec_from_meta(meta)
    check_match(meta, spec, file, dataset, model)
    if guessed:
        log.warning("no %s above %s: defaults for everything but dataset/model/seed/defense "
                    "(base models are retrained if not cached in --run-dir)", SPEC_FILE, file)
    run_dir = run_dir or (found.parent if found is not None else Path(tempfile.mkdtemp(prefix="eval-")))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hp = dict(meta.get("hp") or {})
    try:
        s = build_setup(spec, meta["defense"], hp, device, run_dir)
    except (DefenseConfigError, DatasetError) as e:
        raise EvaluateError(f"checkpoint {str(file)!r}: {e}") from None
    try:
        load_checkpoint(file.parent, s)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluateError(f"checkpoint {str(file)!r} does not fit the {meta['model']!r} model of "
                            f"defense {meta['defense']!r}: {first}") from None
    return s


def eval_spec(s: TrialSetup, attacks: Sequence[str] | None = None, eps: Sequence[float] | None = None,
              masking_samples: int | None = None, **kwargs: Any) -> eval_lib.EvalSpec:
    """The trial's own evaluation settings, with any of them overridden. ``eps``: the primary
    first (default: the spec's ε and curve)."""
    t = s.spec.threat_model
    primary = eps[0] if eps else t.eps
    curve = list(eps[1:]) if eps else t.eval_eps
    options = {"curve_samples": t.curve_samples, "batch_size": max(s.spec.batch_size, 256),
               "seed": s.spec.seed, **kwargs}
    return eval_lib.EvalSpec.for_dataset(
        s.spec.dataset, primary, curve, t.masking_samples if masking_samples is None else masking_samples,
        attacks=tuple(attacks or t.attacks), **options)


def eval_data(s: TrialSetup, samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = samples or s.spec.eval_samples or len(s.data.test_y)
    return as_float(s.data.test_x[:n], s.device), s.data.test_y[:n].to(s.device)


# ---------------------------------------------------------------- the sweep's final evaluation

def apply_report(record: TrialRecord, report: eval_lib.Report, final_attack: str) -> None:
    """Replace a record's evaluation by the final ``report``, keeping the search-time robust
    accuracy in ``robust_acc_search`` (the first one, if a trial is re-evaluated again)."""
    if not record.final_evaluated:
        record.robust_acc_search = record.robust_acc
    record.set_evaluation(report)
    record.final_attack = final_attack


def final_candidates(df: pd.DataFrame, spec: SweepSpec) -> set[str]:
    """Trials that could be on a final front: the first two non-dominated layers at the
    primary ε and at every ε of the curve, plus any trial whose interval reaches a front."""
    if df.empty:
        return set()
    flagged_off = spec.threat_model.exclude_flagged
    objective_sets = [tuple(spec.objectives)]
    objective_sets += [objs for objs, _ in fronts_by_eps(df, spec.objectives, flagged_off).values()]
    ids: set[str] = set()
    for objs in objective_sets:
        ids |= set(front_layers(df, objs, 2, flagged_off)["trial_id"].astype(str))
        ids |= set(df.loc[reaches_front(df, objs, flagged_off), "trial_id"].astype(str))
    return ids


def local_checkpoint(path: str) -> Path:
    """A record's checkpoint as a local folder: Tune's storage may be remote (s3://...)."""
    if "://" not in path:
        return Path(path)
    from ray.tune import Checkpoint

    return Path(Checkpoint(path=path).to_directory())


def with_eval_options(spec: SweepSpec, final_eval: str | None = None,
                      exclude_flagged: bool = False) -> SweepSpec:
    """The sweep CLI's ``--final-eval A,B|none`` / ``--exclude-flagged`` folded into the spec's
    threat model (validated like the spec: SpecError, exit 2, on a bad name)."""
    update: dict[str, Any] = {}
    if final_eval:
        update["final_eval"] = _csv(final_eval)
    if exclude_flagged:
        update["exclude_flagged"] = True
    if not update:
        return spec
    raw = spec.model_dump()
    raw["threat_model"].update(update)
    return parse(raw)


def reevaluate(record: dict[str, Any], spec: dict[str, Any], run_dir: str,
               attacks: Sequence[str]) -> dict[str, Any]:
    """One trial's final evaluation: restore its checkpoint (base models from ``run_dir``,
    never retrained), evaluate it with ``attacks`` on the spec's ``final_samples`` test
    images, return the updated record (as a dict). A checkpoint that cannot be restored
    leaves the record's search-time numbers, with the reason in ``error``.

    The points the search-time evaluation broke (stored in the checkpoint) stay broken and are
    not attacked again, as in a cascade: the final numbers are the worst case over both
    evaluations, and the final attacks' time goes to the points the search left robust."""
    rec, sweep = TrialRecord.from_dict(record), SweepSpec.model_validate(spec)
    r = sweep.resources_for(rec.defense)
    torch.set_num_threads(max(1, int(r.cpus_per_trial)))
    try:
        device = choose_device(r.gpus_per_trial)
        hold_gpu_share(device, r.gpus_per_trial)
        s = restore(local_checkpoint(rec.checkpoint), sweep, Path(run_dir), device)
    except (EvaluateError, NoGPU) as e:
        log.error("trial %s not re-evaluated: %s", rec.trial_id, e)
        rec.error = f"final evaluation: {e}"
        return rec.to_dict()
    try:
        known = saved_broken(checkpoint_file(local_checkpoint(rec.checkpoint)))
        report = eval_lib.evaluate(s.defense, eval_data(s, sweep.final_samples or len(s.data.test_y)),
                                   eval_spec(s, attacks), known, fpr_images=all_test_images(s))
    finally:
        del s
        release_gpu_memory()
    apply_report(rec, report, report.primary.robust_attack)
    return rec.to_dict()


def final_evaluation(run_dir: Path, spec: SweepSpec, attacks: Sequence[str] | None = None) -> list[str]:
    """Re-evaluate every trial that could be on a final front with ``attacks`` (default: the
    spec's ``final_eval``), then again for trials that the new numbers bring close to a
    front, until no candidate is left without final numbers; returns the ids re-evaluated.

    With Ray running (the sweep), each trial is a Ray task holding the trial's own CPUs and
    GPUs, all in parallel, so AutoAttack runs where the trials ran (a cluster's GPU nodes),
    not in the driver; without Ray (a notebook) they run here, one after another."""
    attacks = list(attacks or spec.threat_model.final_eval or [])
    if not attacks:
        return []
    run_dir = Path(run_dir)
    visited: set[str] = set()
    while True:
        records = {r.trial_id: r for r in load_records(run_dir)}
        visited |= {i for i, r in records.items() if r.final_evaluated}
        todo = [records[i] for i in sorted(final_candidates(merge_runs([run_dir]), spec) - visited)
                if i in records]
        if not todo:
            return sorted(i for i in visited if records.get(i) and records[i].final_evaluated)
        for rec in todo:
            visited.add(rec.trial_id)
            if not rec.checkpoint:
                log.warning("trial %s has no checkpoint: kept with its search-time numbers", rec.trial_id)
        for done in _run_all([r for r in todo if r.checkpoint], spec, run_dir, attacks):
            save_record(run_dir, done)
            log.info("final evaluation of %s (%s): robust %.4f (search-time %.4f)", done.trial_id,
                     done.defense, done.robust_acc, done.robust_acc_search)


def _run_all(todo: list[TrialRecord], spec: SweepSpec, run_dir: Path, attacks: list[str]):
    """Yield each re-evaluated record as soon as it is done (Ray tasks, or in this process)."""
    args = (spec.model_dump(), str(run_dir.resolve()), attacks)
    try:
        import ray
    except ImportError:  # the library without Ray installed
        ray = None
    if ray is None or not ray.is_initialized():
        for rec in todo:
            yield TrialRecord.from_dict(reevaluate(rec.to_dict(), *args))
        return
    task = ray.remote(max_retries=1)(reevaluate)

    def submit(rec: TrialRecord):
        # a re-evaluation holds what its defense's trials held (SweepSpec.resources_for)
        r = spec.resources_for(rec.defense)
        return task.options(num_cpus=r.cpus_per_trial, num_gpus=r.gpus_per_trial).remote(rec.to_dict(), *args)

    pending = [submit(rec) for rec in todo]
    while pending:
        # a timeout brings the main thread back to Python every second, where a Ctrl-C (or a
        # SIGTERM turned into one) is raised; a wait without one blocks until a task ends
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        if ready:
            yield TrialRecord.from_dict(ray.get(ready[0]))


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m orchestrator.evaluate",
                       description="Evaluate a trial checkpoint: one attack cascade per ε, then the "
                                   "gradient-masking checks.")
    p.add_argument("checkpoint", type=Path, help=f"a trial's {CHECKPOINT_FILE} or its folder")
    p.add_argument("--attacks", default=None,
                   help="comma-separated attacks and/or presets "
                        f"({', '.join(eval_lib.PRESETS)}); default: the spec's")
    p.add_argument("--preset", default=None, help="shorthand for --attacks PRESET")
    p.add_argument("--eps", default=None,
                   help="comma-separated ε, primary first (e.g. 0.3,0.1,0.2 or 8/255,2/255); "
                        "default: the spec's ε and curve")
    p.add_argument("--norm", default="Linf", help="threat-model norm (only Linf is supported)")
    p.add_argument("--samples", type=int, default=None, help="test images (default: the spec's)")
    p.add_argument("--masking-samples", type=int, default=None,
                   help="points of the gradient-masking checks (0: skip them)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="leave out the defense's own adaptive attacks")
    p.add_argument("--spec", type=Path, default=None,
                   help=f"the sweep spec (YAML/JSON; default: the {SPEC_FILE} above the checkpoint)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="folder whose bases/ holds the base models (default: the spec's run dir)")
    p.add_argument("--dataset", default=None, help="fail unless the checkpoint is of this dataset")
    p.add_argument("--model", default=None, help="fail unless the checkpoint is of this model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the report as JSON here (never over an existing file "
                        "unless --force)")
    p.add_argument("--force", action="store_true", help="let --json replace an existing file")
    return p


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _check_args(args: argparse.Namespace) -> tuple[list[str] | None, list[float] | None]:
    """Everything checkable without loading anything, in the order a user fixes it."""
    if args.attacks and args.preset:
        raise EvaluateError("give --attacks or --preset, not both")
    attacks = _csv(args.attacks) or _csv(args.preset) or None
    if args.preset and args.preset not in eval_lib.PRESETS:
        raise EvaluateError(f"unknown preset {args.preset!r}; valid presets: {', '.join(eval_lib.PRESETS)}")
    try:
        eval_lib.check_attacks(attacks or ["fast"], args.norm)
        eps = [eval_lib.parse_eps(e) for e in _csv(args.eps)] or None
    except eval_lib.EvalConfigError as e:
        raise EvaluateError(str(e)) from None
    if args.eps is not None and not eps:
        raise EvaluateError("--eps: give at least one ε, e.g. --eps 0.3 or --eps 8/255,2/255")
    for name, v in (("--samples", args.samples), ("--masking-samples", args.masking_samples)):
        if v is not None and v < (1 if name == "--samples" else 0):
            raise EvaluateError(f"{name}={v} must be {'positive' if name == '--samples' else '≥ 0'}")
    if args.device not in (None, "cpu", "cuda"):
        raise EvaluateError(f"--device {args.device!r}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda: no CUDA device here; drop --device or use cpu")
    if args.json is not None and (problem := overwrite_problem([args.json], args.force)):
        raise EvaluateError(f"--json: {problem}")
    return attacks, eps


def report_dict(report: eval_lib.Report, meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "flags": report.flags, "evidence": report.evidence,
            "seconds": report.seconds, "columns": report.curve_columns(),
            "results": {eval_lib.eps_label(e): {
                "eps": r.eps, "n": r.n, "clean_acc": r.clean_acc, "robust_acc": r.robust_acc,
                "robust_attack": r.robust_attack, "acc": r.acc, "broken_by": r.broken_by,
                "clean_rejected": r.clean_rejected, "seconds": r.seconds}
                for e, r in report.results.items()}}


def print_report(report: eval_lib.Report, s: TrialSetup) -> None:
    print(f"defense {s.defense_name} on {s.spec.dataset}/{s.spec.model}, hp {s.hp}")
    print(f"{'ε':>8}  {'n':>5}  {'clean':>7}  {'robust':>7}  after each attack (cascade)")
    for eps, r in report.results.items():
        steps = " | ".join(f"{a} {v:.4f}" for a, v in r.acc.items())
        print(f"{eval_lib.eps_label(eps):>8}  {r.n:>5}  {r.clean_acc:7.4f}  {r.robust_acc:7.4f}  {steps}")
    raised = sorted(k for k, v in report.flags.items() if v)
    if not report.flags:
        print("gradient-masking checks: not run")
    else:
        print("gradient-masking flags: " + (", ".join(raised) if raised else "none raised"))
        print("  " + ", ".join(f"{k.removeprefix('masking.')}={v:.4g}"
                               for k, v in report.evidence.items() if not math.isnan(v)))
    if "fpr" in report.metrics:
        print(f"detector: rejects {100 * report.metrics['fpr']:.1f} % of "
              f"{report.metrics['n_fpr']} clean test images (realized FPR)")
    print(f"{report.seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        attacks, eps = _check_args(args)
        spec = load_spec_file(args.spec) if args.spec is not None else None
        s = restore(args.checkpoint, spec, args.run_dir,
                    torch.device(args.device) if args.device else None, args.dataset, args.model)
        espec = eval_spec(s, attacks, eps, args.masking_samples, norm=args.norm,
                          adaptive=not args.no_adaptive)
    except (BadInput, eval_lib.EvalConfigError) as e:
        return complain("evaluate", str(e))
    report = eval_lib.evaluate(s.defense, eval_data(s, args.samples), espec,
                               fpr_images=all_test_images(s))
    print_report(report, s)
    if args.json is not None:
        meta = {"checkpoint": str(args.checkpoint), "defense": s.defense_name, "hp": s.hp,
                "dataset": s.spec.dataset, "model": s.spec.model,
                "attacks": [a if isinstance(a, str) else a.name for a in espec.attacks]}
        write_json_atomic(args.json, report_dict(report, meta))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
