"""Run a sweep: ``python orchestrator/sweep.py [--spec FILE | --preset NAME] [--out DIR]
[--resume] [--no-dashboard] [--address ADDR] [--storage-path URI]``.

Validates everything first (bad input: one line, exit 2, before Ray starts), starts a local Ray
or joins a cluster (under ``ray submit`` on a cluster head: the cluster running there), runs one
Ray Tune search per defense (OptunaSearch, multi-objective), then merges the trial records and
writes trials.csv, pareto.csv (and .parquet), pareto.png, manifest.json. Tune's experiment state and the
trials' checkpoints go to the storage path (OUT/tune unless ``--storage-path`` names a shared
folder or s3://...: what a multi-node cluster needs, and what survives the head)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (also under `ray submit`): import the installed package, and never
    # let this folder's modules shadow top-level ones.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console table stays silent
# Short MNIST epochs checkpoint often by design; Tune's advice about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from defenses.core import data as data_lib  # noqa: E402
from orchestrator import outdir  # noqa: E402
from orchestrator.cli import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_INTERRUPTED, BadInput  # noqa: E402
from orchestrator.spec import SweepSpec, load, space_module  # noqa: E402

log = logging.getLogger("orchestrator.sweep")


class InputError(BadInput):
    """Bad input found before any expensive work: one line, exit code 2."""


class ExportFailed(Exception):
    """The CSVs/manifest could not be written (the records are): one line, exit code 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", help="YAML sweep spec")
    src.add_argument("--preset", help="built-in spec: smoke, default (the default) or cifar10 "
                     "(for GPU clusters; needs --data-root)")
    p.add_argument("--out", help="output directory (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    p.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the live view")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join: host:port, 'auto' (the one running here) or 'local' "
                        "(a fresh local Ray); default RAY_ADDRESS, else a running one, else local")
    p.add_argument("--data-root", help="folder holding CIFAR data (overrides the spec)")
    p.add_argument("--storage-path", help="where Tune keeps experiment state and checkpoints: a "
                   "folder every node sees, or s3://bucket/prefix (default: OUT/tune)")
    # evaluation: the strong re-evaluation of the trials that could be on a final front
    p.add_argument("--final-eval", help="after the search, re-evaluate every trial that could be on "
                   "a final front with these attacks or presets (comma-separated; default: the "
                   "spec's threat_model.final_eval, AutoAttack 'standard'); 'none' keeps the "
                   "search-time numbers")
    p.add_argument("--exclude-flagged", action="store_true",
                   help="keep trials with a raised flag (e.g. gradient masking) off the Pareto fronts")
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
        # validated again: SweepSpec makes it absolute (trials run in other working directories)
        spec = SweepSpec.model_validate({**spec.model_dump(), "data_root": args.data_root})
    return spec


def resolve_storage(args: argparse.Namespace, out: Path) -> str:
    """--storage-path, else (resuming) the one the run used, else OUT/tune."""
    saved = out / "run.json"
    used = json.loads(saved.read_text()).get("storage_path") if args.resume and saved.is_file() else None
    if args.storage_path and used and _same_place(args.storage_path) != _same_place(used):
        raise InputError(f"--resume: the run in {out} keeps its state in {used}, not "
                         f"{args.storage_path}; drop --storage-path to resume it")
    return args.storage_path or used or str(out / "tune")


def code_version() -> dict:
    """What a run's numbers were computed with: git SHA and key package versions."""
    from orchestrator.export import git_sha, package_versions

    return {"git_sha": git_sha(), "versions": package_versions()}


def code_changes(out: Path) -> str | None:
    """One line naming what differs between the code that started the run in ``out`` and the
    code resuming it (None: the same, or unknown)."""
    try:
        saved = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    now = code_version()
    changed = []
    if saved.get("git_sha") and now["git_sha"] and saved["git_sha"] != now["git_sha"]:
        changed.append(f"git {saved['git_sha'][:8]} -> {now['git_sha'][:8]}")
    for name, was in (saved.get("versions") or {}).items():
        if was and now["versions"].get(name) and was != now["versions"][name]:
            changed.append(f"{name} {was} -> {now['versions'][name]}")
    if not changed:
        return None
    return (f"warning: resuming {out} with other code than it started with ({', '.join(changed)}); "
            "its finished trials keep the numbers the earlier code computed")


def _same_place(storage: str) -> str:
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def check_out_dir(out: Path, resume: bool) -> None:
    """``--resume`` needs an earlier run in ``out``; a new sweep needs ``out`` absent or empty
    (the lock this sweep holds aside): nothing a user keeps there is ever overwritten."""
    if resume:
        if not (out / "spec.json").is_file():
            raise InputError(f"--resume: {out} holds no earlier run to resume; drop --resume to start one")
    else:
        problem = outdir.fresh_problem(out, ignore=(outdir.LOCK_FILE,))
        if problem:
            raise InputError(problem)
    _check_writable(out, f"output dir {out}", "--out")


def existing_cluster(address: str | None) -> str | None:
    """The address to give ``ray.init``, or None for a fresh local Ray. ``local`` forces a
    fresh local Ray; host:port joins that cluster (with token authentication on, set
    RAY_AUTH_MODE=token as Ray asks for explicit addresses). Without an address, a running
    cluster on this machine (what `ray submit` finds on a cluster head) is joined when Ray's
    bootstrap file names one that answers; the file is looked up where `ray start` writes it
    (RAY_TMPDIR/ray, else /tmp/ray). That cluster is joined as ``auto``: only then does Ray read
    the token of a cluster with token authentication (~/.ray/auth_token) by itself."""
    if address == "local":
        return None
    if address and address != "auto":
        return address
    found = detected_cluster()
    if found and _answers(found):
        log.info("found the Ray cluster at %s", found)
        return "auto"
    if address == "auto":
        raise InputError("--address auto: no running Ray cluster found on this machine; start one "
                         "with `ray start --head` or drop --address to run locally")
    return None


def detected_cluster() -> str:
    """host:port of the cluster `ray start` last started on this machine, or ''."""
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    return current.read_text().strip() if current.is_file() else ""


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


def check_resources(spec: SweepSpec, cpus: float, gpus: float, where: str,
                    node_cpus: float | None = None, node_gpus: float | None = None) -> None:
    """A trial must fit: each worker on one node, all its workers in the cluster at once.
    ``node_*``: the largest node's (None: one machine). Checked for every defense's resources
    (``SweepSpec.resources_for``)."""
    for defense in spec.defenses:
        r = spec.resources_for(defense)
        _check_fits(r, cpus, gpus, where, node_cpus, node_gpus,
                    "" if r == spec.resources else f" (for {defense})")


def _check_fits(r, cpus: float, gpus: float, where: str, node_cpus: float | None,
                node_gpus: float | None, whose: str) -> None:
    node_cpus = cpus if node_cpus is None else node_cpus
    node_gpus = gpus if node_gpus is None else node_gpus
    if r.cpus_per_trial > node_cpus:
        raise InputError(f"resources.cpus_per_trial={r.cpus_per_trial:g}{whose} but {where} has {node_cpus:g} "
                         "CPUs per node; a trial would wait forever: lower it")
    if r.gpus_per_trial > node_gpus:
        raise InputError(f"resources.gpus_per_trial={r.gpus_per_trial:g}{whose} but {where} has {node_gpus:g} "
                         "GPUs per node; a trial would wait forever: lower it (0 runs on the CPU)")
    n = r.workers_per_trial
    if n > 1 and (r.trial_cpus() > cpus or r.trial_gpus() > gpus):
        raise InputError(f"resources.workers_per_trial={n}{whose} needs {r.trial_cpus():g} CPUs and "
                         f"{r.trial_gpus():g} GPUs but {where} has {cpus:g} CPUs and {gpus:g} GPUs; "
                         "a trial would wait forever: lower workers_per_trial or the per-worker resources")


def concurrent_trials(spec: SweepSpec, cpus: float, gpus: float) -> int:
    """How many trials may run at once: as many as the cluster fits of the defense with the
    smallest trials (Tune still places each by its own resources), capped by ``resources.max_concurrent``.
    Tune needs the number: with a search algorithm of its own kind it starts one trial at a
    time unless ``max_concurrent_trials`` is set (``_get_max_pending_trials``, Ray 2.60), so
    a 64-slot cluster would fill one trial launch after another. A data-parallel trial's
    function holds no resources itself (its workers do): it counts with its workers'."""
    fits = []
    for defense in spec.defenses:
        r = spec.resources_for(defense)
        fit = cpus // r.trial_cpus()
        if r.trial_gpus() > 0:
            fit = min(fit, gpus // r.trial_gpus())
        fits.append(int(fit))
    most = max(1, max(fits))
    cap = spec.resources.max_concurrent
    return min(most, cap) if cap else most


def _check_writable(folder: Path, what: str, option: str) -> None:
    """Create ``folder`` and write a probe file in it: InputError naming ``option`` if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} is not writable ({e.strerror}); choose another {option}") from None


def check_storage(storage: str) -> str:
    """The storage path as Tune takes it (an absolute path or a URI), after writing a probe
    file there: an unreachable or read-only storage stops the sweep before it starts."""
    import pyarrow.fs

    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        _check_writable(path, f"storage path {storage}", "--storage-path")
        return str(path)
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex[:6]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... with one-line messages
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"storage path {storage} is not reachable ({reason}); check the URI and "
                         "the credentials of this machine, or choose another --storage-path") from None
    return storage.rstrip("/")


def cluster_capacity(ray) -> dict[str, float]:
    """CPUs and GPUs the cluster has now, or can have: on an autoscaling cluster's head (the
    launcher leaves its config in ~/ray_bootstrap_config.yaml) worker nodes that do not run yet
    count at their node type's max_workers, when the type states its resources."""
    cpus = gpus = node_cpus = node_gpus = 0.0
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            cpus, gpus = cpus + res.get("CPU", 0), gpus + res.get("GPU", 0)
            node_cpus, node_gpus = max(node_cpus, res.get("CPU", 0)), max(node_gpus, res.get("GPU", 0))
    now = {"cpus": cpus, "gpus": gpus, "node_cpus": node_cpus, "node_gpus": node_gpus}
    from orchestrator.cluster import autoscaling_capacity

    possible = autoscaling_capacity(Path.home() / "ray_bootstrap_config.yaml")
    return {k: max(now[k], possible.get(k, 0.0)) for k in now}


def check_storage_shared(ray, storage: str) -> None:
    """Tune's storage path must be one every node of the cluster sees: since Ray 2.7 nothing
    syncs trial folders to the head, so a folder on the head's disk alone would leave each
    trial's checkpoints (and what resume and the final evaluation read) on the node that ran
    it. Every alive node looks for a probe file written here; a URI (s3://, gs://) is shared by
    design. Nodes an autoscaler adds later cannot be asked yet: a warning names the risk."""
    if "://" in storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        probe = Path(storage) / f".shared-probe-{uuid.uuid4().hex[:8]}"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(socket.gethostname())
        try:
            from orchestrator.cluster import nodes_not_seeing

            blind = nodes_not_seeing(ray, nodes, str(probe))
        finally:
            probe.unlink(missing_ok=True)
        if blind:
            raise InputError(f"storage path {storage} is not shared: node(s) {', '.join(blind)} of the "
                             "cluster do not see it; pass --storage-path on a folder every node "
                             "mounts (NFS) or s3://bucket/prefix")
    from orchestrator.cluster import can_add_workers

    if can_add_workers(Path.home() / "ray_bootstrap_config.yaml"):
        log.warning("storage path %s is a folder: worker nodes the autoscaler adds later must see "
                    "it too (NFS), or pass --storage-path s3://bucket/prefix", storage)


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# ---------------------------------------------------------------- running
def run_sweep(spec: SweepSpec, out: Path, resume: bool, dashboard_on: bool, address: str | None,
              storage: str | None = None, tracker=None) -> int:
    """The sweep on Ray: one Tune run for every defense's trials (``DefenseRouter`` gives each
    defense its own Optuna study), the exports, the final evaluation, the exports again.
    ``tracker``: an ``orchestrator.tracking.MlflowTracker`` or None."""
    import ray
    from ray import tune
    from rich.console import Console

    from orchestrator.dashboard import Dashboard
    from orchestrator.tracking import TrackingCallback
    from orchestrator.tune_adapter import (RecordWriter, TrialResources, close_orphan_trials,
                                           name_objectives, tune_trial)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # MLflow 2.14 (the one torchattacks' requests pin leaves, pyproject.toml) warns that it
    # imports pkg_resources, and Ray's usage tagging imports MLflow whenever it is installed
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", module=r"mlflow\.")
    started = time.time()
    run_id = out.name
    storage = storage or str(out.resolve() / "tune")
    if not ray.is_initialized():
        if not address:
            quiet_local_token_notice()
        ray.init(address=address or "local", include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    received = stop_on_signals()  # after ray.init: Ray's driver handler must not win
    cap = cluster_capacity(ray)
    check_resources(spec, cap["cpus"], cap["gpus"], "the Ray cluster", cap["node_cpus"], cap["node_gpus"])
    check_storage_shared(ray, storage)
    (out / "spec.json").write_text(json.dumps(spec.model_dump(), indent=1))
    (out / "run.json").write_text(json.dumps({"storage_path": storage, **code_version()}, indent=1))

    r = spec.resources
    console = Console()
    own = {d: spec.resources_for(d) for d in spec.defenses}
    board = Dashboard(spec.total_trials(), r.trial_cpus(), r.trial_gpus(),
                      cap["cpus"], cap["gpus"], console=console,
                      live=None if dashboard_on else False,
                      per_defense={d: (o.trial_cpus(), o.trial_gpus()) for d, o in own.items()},
                      objectives=spec.objectives)
    for defense in spec.defenses:
        board.begin_defense(defense, list(getattr(space_module(defense), "KEY_HPARAMS", [])))
    interrupted = False
    board.start()
    try:
        trainable = tune.with_resources(
            tune.with_parameters(tune_trial, spec=spec.model_dump(), run_dir=str(out.resolve()),
                                 run_id=run_id, storage=storage),
            TrialResources(spec))
        callbacks = [RecordWriter(out, spec, run_id), board] + ([TrackingCallback(tracker)] if tracker else [])
        tuner = _tuner(tune, trainable, spec, out, resume, callbacks, storage,
                       concurrent_trials(spec, cap["cpus"], cap["gpus"]))
        fit_restoring_sigint(tuner.fit)
        # Ground truth for "did the sweep finish": every trial leaves a final record
        # (completed or failed). Fewer records than trials means Tune was interrupted.
        from orchestrator.records import load_records
        if len({r.trial_id for r in load_records(out)}) < spec.total_trials():
            interrupted = True
        else:
            for defense in spec.defenses:
                close_orphan_trials(spec, defense, out)
                name_objectives(spec, defense, out)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        board.stop()
        _export(spec, out, started, tracker)
    if interrupted:
        return _interrupted(out, received)
    if spec.threat_model.final_eval:
        from orchestrator.evaluate import final_evaluation

        print(f"final evaluation ({'+'.join(spec.threat_model.final_eval)}) of the trials that "
              "could be on a final front ...", file=sys.stderr)
        t0 = time.time()
        try:
            done = final_evaluation(out, spec)
        except KeyboardInterrupt:  # the re-evaluations saved so far are kept; resume does the rest
            _export(spec, out, started, tracker)
            return _interrupted(out, received)
        print(f"final evaluation: {len(done)} trials re-evaluated in {time.time() - t0:.0f} s",
              file=sys.stderr)
        _export(spec, out, started, tracker)
        print_front(out / "pareto.csv")
    print(f"done: {out / 'pareto.csv'} ({out / 'trials.csv'}, {out / 'pareto.png'})")
    return 0


def fit_restoring_sigint(fit) -> Any:
    """``fit()`` with the process's SIGINT handler given back after it. Tune (2.60,
    ``tune.tune._setup_signal_catching``) installs its own handler for a run and restores the
    old one only when a signal arrives: after a finished fit, the next Ctrl-C (or SIGTERM,
    which becomes one) would only set the finished run's stop event, and a final evaluation
    would go on running."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return fit()
    finally:
        signal.signal(signal.SIGINT, before)


def stop_on_signals() -> dict[str, int]:
    """SIGTERM (Slurm, Kubernetes, spot preemption) and SIGHUP (a closed SSH session) stop the
    sweep as Ctrl-C does: each is turned into a SIGINT, so Tune stops the running trials and
    saves its state, and the CSVs of everything finished are written. Returns where the
    signal received is noted (for the exit code, 128 + its number)."""
    received: dict[str, int] = {}

    def as_ctrl_c(signum, frame):
        received.setdefault("signal", signum)
        signal.raise_signal(signal.SIGINT)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, as_ctrl_c)
    return received


def _interrupted(out: Path, received: dict[str, int]) -> int:
    sig = received.get("signal")
    what = f"stopped by {signal.Signals(sig).name}" if sig else "interrupted"
    print(f"{what}: results so far are in {out}; resume with: "
          f"python orchestrator/sweep.py --resume --out {out}", file=sys.stderr)
    return 128 + sig if sig else EXIT_INTERRUPTED


# Ray's logger of its token-authentication setup (checked on Ray TUNE_PRIVATE_API_CHECKED)
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
TUNE_PRIVATE_API_CHECKED = "2.60"


def quiet_local_token_notice() -> None:
    """Ray 2.60 turns token authentication on for a new local cluster (this machine's, only
    this user's processes join it) and says so in a warning at the top of every run; the
    sweep keeps the authentication and drops the notice. Setting RAY_AUTH_MODE=token instead
    does not do: Ray then wants a token it has not generated yet."""
    logging.getLogger(RAY_TOKEN_LOGGER).addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())  # the Ray version use_live_callbacks was written against


def use_live_callbacks(tuner, callbacks) -> None:
    """A restored Tuner runs with the callbacks pickled into its experiment state, copies
    that no longer reach this driver's dashboard and record writer: give it the live ones.
    Tune has no public way to do this, so this reaches into ``Tuner._local_tuner`` (checked
    on Ray ``TUNE_PRIVATE_API_CHECKED``; tests/test_sweep.py fails on another version)."""
    tuner._local_tuner.get_run_config().callbacks = callbacks


def make_scheduler(spec: SweepSpec):
    """The spec's trial scheduler: None (every trial to its last epoch) or MO-ASHA on the
    per-epoch validation numbers of the spec's objectives."""
    s = spec.scheduler
    if s.name == "none":
        return None
    from orchestrator.mo_asha import MOASHA
    from orchestrator.records import tune_modes

    return MOASHA([f"val.{o}" for o in spec.objectives], spec.epochs, s.grace_period, s.reduction_factor,
                  mode=tune_modes(spec.objectives), keep_nondominated=s.keep_nondominated)


EXPERIMENT = "sweep"  # the Tune experiment's folder in the storage: STORAGE/sweep


def _tuner(tune, trainable, spec: SweepSpec, out: Path, resume: bool, callbacks, storage: str,
           max_concurrent: int | None):
    from orchestrator.tune_adapter import make_router

    experiment = f"{storage}/{EXPERIMENT}"
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                   resume_errored=spec.max_failures > 0)
        use_live_callbacks(tuner, callbacks)
        return tuner
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=make_router(spec, out), scheduler=make_scheduler(spec),
                                    num_samples=spec.total_trials(), reuse_actors=True,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def print_front(pareto_csv: Path) -> None:
    """The exported front, one line per member, with 95 % intervals and where its robust
    accuracy comes from (the final evaluation, or the search when it was not re-evaluated)."""
    import pandas as pd

    front = pd.read_csv(pareto_csv, dtype={"trial_id": str})
    print(f"Pareto front ({len(front)} trials; 95 % Wilson intervals):")
    for _, r in front.iterrows():
        source = "final" if str(r.get("final_evaluated")) == "True" else "search-time"
        print(f"  {r.trial_id} {r.defense:18s} clean {100 * r.clean_acc:5.1f}% "
              f"[{100 * r.clean_acc_ci_low:.1f}, {100 * r.clean_acc_ci_high:.1f}]  robust "
              f"{100 * r.robust_acc:5.1f}% [{100 * r.robust_acc_ci_low:.1f}, "
              f"{100 * r.robust_acc_ci_high:.1f}] ({source}, n={int(r.n_eval)})"
              + (f"  cost {r.cost:.0f} {r.cost_unit}" if "cost" in front and r.cost == r.cost else ""))


def _export(spec: SweepSpec, out: Path, started: float, tracker=None) -> None:
    from orchestrator.aggregate import front_summary, merge_runs
    from orchestrator.export import export_all, write_manifest

    final = spec.threat_model.final_eval
    try:
        trials = merge_runs([out])
        export_all(trials, out, objectives=tuple(spec.objectives),
                   exclude_flagged=spec.threat_model.exclude_flagged)
        write_manifest(out, spec.model_dump(), started, time.time(), [spec.seed], extra={
            "front": front_summary(trials, spec.objectives, spec.threat_model.exclude_flagged),
            "final_eval": final or "none",
            "numbers": "final: the trials that could be on a front were re-evaluated with final_eval "
                       "(final_evaluated, final_attack per trial)" if final else
                       "search-time: no final re-evaluation (final_eval none); robust accuracies are "
                       "those of the search-time attacks"})
    except OSError as e:  # disk full, folder made read-only: the records are kept, resume exports
        raise ExportFailed(f"{outdir.write_failure(out, e)}; once there is room: "
                           f"python orchestrator/sweep.py --resume --out {out}") from None
    if tracker is not None:
        from orchestrator.tracking import log_records_safely
        log_records_safely(tracker, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lock = None
    try:
        out = Path(args.out) if args.out else None
        if args.resume:
            if out is None:
                raise InputError("--resume needs --out DIR: the run directory to continue")
            check_out_dir(out, resume=True)
            lock = hold_lock(out)
            if (changes := code_changes(out)):
                print(changes, file=sys.stderr)
        spec = resolve_spec(args, out)
        from orchestrator.evaluate import with_eval_options
        spec = with_eval_options(spec, args.final_eval, args.exclude_flagged)
        data_lib.check_available(spec.dataset, spec.data_root)  # before a fresh --out is made
        if not args.resume:
            out = out or Path("runs") / spec.name
            if (problem := outdir.fresh_problem(out)) and not (out / outdir.LOCK_FILE).exists():
                raise InputError(problem)  # before the lock: a folder with files is left as it is
            lock = hold_lock(out)
            check_out_dir(out, resume=False)
        storage = check_storage(resolve_storage(args, out))
        address = existing_cluster(args.address)
        if address and address != "auto":
            check_reachable(address)
        else:
            check_resources(spec, float(os.cpu_count() or 1), float(local_gpus()), "this machine")
        from orchestrator.tracking import make_tracker
        tracker = make_tracker(spec)
    except (BadInput, data_lib.DatasetError, outdir.LockHeld) as e:
        if lock is not None:
            lock.release()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if address:
            where = detected_cluster() + " (running on this machine)" if address == "auto" else address
            print(f"joining the Ray cluster at {where}", file=sys.stderr)
        return run_sweep(spec, out, args.resume, not args.no_dashboard, address, storage, tracker)
    except InputError as e:  # cluster resources, known only once connected
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ExportFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_EXPORT_FAILED
    finally:
        lock.release()


def hold_lock(out: Path) -> outdir.RunLock:
    """One sweep per folder: ``OUT/.sweep.lock`` (outdir.RunLock); a live holder is named in
    the one-line error."""
    _check_writable(out, f"output dir {out}", "--out")
    lock = outdir.RunLock(out)
    lock.acquire()
    return lock


if __name__ == "__main__":
    sys.exit(main())
