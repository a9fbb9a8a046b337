"""Run a sweep: ``python orchestrator/sweep.py [--spec FILE | --preset NAME] [--out DIR]
[--resume] [--no-dashboard] [--address ADDR]``.

Validates everything first (bad input: one line, exit 2, before Ray starts), starts a local Ray
or joins a cluster, runs one Ray Tune search per defense (OptunaSearch, multi-objective),
then merges the trial records and writes trials.csv, pareto.csv, pareto.png, manifest.json."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also under `ray submit`): import the installed package, and never
    # let this folder's modules shadow top-level ones.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console table stays silent
# Short MNIST epochs checkpoint often by design; Tune's advice about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from defenses import data as data_lib  # noqa: E402
from orchestrator.spec import SpecError, SweepSpec, build_space, load, space_module  # noqa: E402

log = logging.getLogger("orchestrator.sweep")
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class InputError(Exception):
    """Bad input found before any expensive work: one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", help="YAML sweep spec")
    src.add_argument("--preset", help="built-in spec: smoke or default (the default)")
    p.add_argument("--out", help="output directory (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    p.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the live view")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join: host:port, 'auto' (the one running here) or 'local' "
                        "(a fresh local Ray); default RAY_ADDRESS, else a running one, else local")
    p.add_argument("--data-root", help="folder holding CIFAR data (overrides the spec)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- validation (no Ray yet)
def resolve_spec(args: argparse.Namespace, out: Path | None) -> SweepSpec:
    if args.resume and out is not None and (out / "spec.json").is_file():
        saved = SweepSpec.model_validate(json.loads((out / "spec.json").read_text()))
        if args.spec or args.preset:
            given = load(args.spec, args.preset)
            if given.model_dump() != saved.model_dump():
                raise InputError(f"--resume: the spec given differs from the one of the run in {out}; "
                                 "drop --spec/--preset to resume it as it was")
        return saved
    spec = load(args.spec, args.preset)
    if args.data_root:
        spec = spec.model_copy(update={"data_root": args.data_root})
    return spec


def check_out_dir(out: Path, resume: bool) -> None:
    earlier = (out / "spec.json").exists() or (out / "records").exists()
    if resume and not earlier:
        raise InputError(f"--resume: {out} holds no earlier run to resume; drop --resume to start one")
    if not resume and earlier:
        raise InputError(f"output dir {out} holds an earlier run; pass --resume to continue it or "
                         "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output dir {out} is not writable ({e.strerror}); choose another --out") from None


def existing_cluster(address: str | None) -> str | None:
    """The address of the cluster to join, or None for a fresh local Ray. ``local`` forces a
    fresh local Ray. Without an address, a running cluster on this machine (what `ray submit`
    finds on a cluster head) is joined when Ray's bootstrap file names one that answers."""
    if address == "local":
        return None
    if address and address != "auto":
        return address
    current = Path("/tmp/ray/ray_current_cluster")
    found = current.read_text().strip() if current.is_file() else ""
    if found and _answers(found):
        return found
    if address == "auto":
        raise InputError("--address auto: no running Ray cluster found on this machine; start one "
                         "with `ray start --head` or drop --address to run locally")
    return None


def _answers(address: str, timeout: float = 3.0) -> bool:
    hostport = address.removeprefix("ray://").removeprefix("http://")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def check_reachable(address: str) -> None:
    if not _answers(address):
        raise InputError(f"cannot reach a Ray cluster at {address!r}; check the address (host:port of "
                         "the head's GCS, default port 6379) or drop --address to run locally")


def check_resources(spec: SweepSpec, cpus: float, gpus: float, where: str) -> None:
    r = spec.resources
    if r.cpus_per_trial > cpus:
        raise InputError(f"resources.cpus_per_trial={r.cpus_per_trial:g} but {where} has {cpus:g} CPUs; "
                         "a trial would wait forever: lower it")
    if r.gpus_per_trial > gpus:
        raise InputError(f"resources.gpus_per_trial={r.gpus_per_trial:g} but {where} has {gpus:g} GPUs; "
                         "a trial would wait forever: lower it (0 runs on the CPU)")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# ---------------------------------------------------------------- running
def run_sweep(spec: SweepSpec, out: Path, resume: bool, dashboard_on: bool, address: str | None) -> int:
    import ray
    from ray import tune
    from rich.console import Console

    from orchestrator.dashboard import Dashboard
    from orchestrator.records import load_records
    from orchestrator.tune_adapter import RecordWriter, make_searcher, tune_trial

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.time()
    run_id = out.name
    (out / "spec.json").write_text(json.dumps(spec.model_dump(), indent=1))
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    cluster = ray.cluster_resources()
    check_resources(spec, cluster.get("CPU", 0), cluster.get("GPU", 0), "the Ray cluster")

    r = spec.resources
    console = Console()
    board = Dashboard(spec.total_trials(), r.cpus_per_trial, r.gpus_per_trial,
                      cluster.get("CPU", 0), cluster.get("GPU", 0), console=console,
                      live=None if dashboard_on else False)
    writer = RecordWriter(out, spec, run_id)
    interrupted = False
    board.start()
    try:
        for defense in spec.defenses:
            writer.defense = defense
            board.begin_defense(defense, list(getattr(space_module(defense), "KEY_HPARAMS", [])))
            trainable = tune.with_resources(
                tune.with_parameters(tune_trial, defense=defense, spec=spec.model_dump(),
                                     run_dir=str(out.resolve()), run_id=run_id),
                {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
            tuner = _tuner(tune, trainable, spec, defense, out, resume, [writer, board], make_searcher)
            tuner.fit()
            # Ground truth for "did this defense finish": every trial leaves a final record
            # (completed or failed). Fewer records than trials means Tune was interrupted.
            finished = {r.trial_id for r in load_records(out) if r.defense == defense}
            if len(finished) < spec.trials_for(defense):
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        board.stop()
        _export(spec, out, started)
    if interrupted:
        print(f"interrupted: results so far are in {out}; resume with: "
              f"python orchestrator/sweep.py --resume --out {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {out / 'pareto.csv'} ({out / 'trials.csv'}, {out / 'pareto.png'})")
    return 0


def _tuner(tune, trainable, spec: SweepSpec, defense: str, out: Path, resume: bool, callbacks,
           make_searcher):
    experiment = out.resolve() / "tune" / defense
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True,
                                   resume_errored=spec.max_failures > 0)
        # restored run configs carry unpicklable-free copies of the callbacks: use the live ones
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
    r = spec.resources
    return tune.Tuner(
        trainable,
        param_space={"hp": build_space(spec, defense)},
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, defense, out),
                                    num_samples=spec.trials_for(defense), reuse_actors=True,
                                    max_concurrent_trials=r.max_concurrent),
        run_config=tune.RunConfig(
            name=defense, storage_path=str(out.resolve() / "tune"), verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def _export(spec: SweepSpec, out: Path, started: float) -> None:
    from orchestrator.aggregate import merge_runs
    from orchestrator.export import export_all, write_manifest

    export_all(merge_runs([out]), out, objectives=tuple(spec.objectives))
    write_manifest(out, spec.model_dump(), started, time.time(), [spec.seed])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = Path(args.out) if args.out else None
        if args.resume:
            if out is None:
                raise InputError("--resume needs --out DIR: the run directory to continue")
            check_out_dir(out, resume=True)
        spec = resolve_spec(args, out)
        if not args.resume:
            out = out or Path("runs") / spec.name
            check_out_dir(out, resume=False)
        data_lib.check_available(spec.dataset, spec.data_root)
        address = existing_cluster(args.address)
        if address:
            check_reachable(address)
        else:
            check_resources(spec, float(os.cpu_count() or 1), float(local_gpus()), "this machine")
    except (SpecError, InputError, data_lib.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run_sweep(spec, out, args.resume, not args.no_dashboard, address)
    except InputError as e:  # cluster resources, known only once connected
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
