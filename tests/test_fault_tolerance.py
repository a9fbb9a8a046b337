"""Sweeps survive what real clusters do to them: a worker node dying mid-trial, the driver
dying mid-sweep, a trial that fails every time. The multi-node cases run on a cluster of
several Ray nodes on this machine (``ray.cluster_utils.Cluster``), the sweep in a separate
process joining it with --address, as `ray submit` would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
import yaml

import psutil  # noqa: E402

from defenses.core import registry
from orchestrator import sweep
from orchestrator.training import base_key
from orchestrator.spec import parse
from orchestrator.trial import LocalReporter, run_trial

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [sys.executable, str(ROOT / "orchestrator" / "sweep.py")]


def sweep_env() -> dict[str, str]:
    """The sweep subprocess's environment, read when it starts: Ray's ray.init (the session's
    local Ray of other tests) sets RAY_AUTH_MODE=token in this process, so a Cluster started
    after it wants a token, and a sweep given an environment copied before it cannot join."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_spec(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def cluster():
    """A head that runs no trials and two one-CPU worker nodes."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # Cluster advertises itself in Ray's bootstrap file; other sweeps on this machine must not
    # find and join it (the tests pass its address explicitly).
    Path(get_ray_address_file(None)).unlink(missing_ok=True)
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def node_running_trial(workers) -> object | None:
    """The worker node whose processes include a busy Tune trial actor."""
    for node in workers:
        raylet = node.all_processes["raylet"][0].process.pid
        for proc in psutil.Process(raylet).children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "ImplicitFunc" in title or "tune_trial" in title:
                return node
    return None


def results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []


# ------------------------------------------------------------------ a worker node dies
NODE_SPEC = {"name": "ft-node", "epochs": 3, "train_samples": 500, "eval_samples": 100,
             "batch_size": 50, "seed": 3, "max_failures": 2, "search": "random",
             "threat_model": {"eps": 0.3, "attacks": ["fgsm", "pgd-5"], "train_steps": 3,
                              "final_eval": "none"},
             "defenses": {"pgd_at": {"trials": 1, "space": {"lr": [0.002], "clean_weight": [0.5]}}}}


@pytest.mark.slow
def test_worker_node_killed_mid_trial_resumes_from_its_checkpoint(cluster, tmp_path):
    c, workers = cluster
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", NODE_SPEC)
    proc = subprocess.Popen(SWEEP + ["--spec", spec, "--out", str(out), "--no-dashboard",
                                     "--address", c.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sweep_env())
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        if list((out / "tune" / "sweep").glob("*/checkpoint_000000")):
            killed = node_running_trial(workers)
            if killed is not None:
                c.remove_node(killed, allow_graceful=False)
        time.sleep(0.2)
    assert killed is not None, proc.communicate()
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 1 and trials.status.iloc[0] == "completed", trials.error.iloc[0]
    trial_dir = next((out / "tune" / "sweep").glob("tune_trial_*"))
    starts = [r.get("start_epoch") for r in results(trial_dir) if "start_epoch" in r]
    # the last attempt began after an epoch checkpoint (Tune may rewrite result.json when it
    # restores the trial, so the first attempt's rows are not always still there)
    assert starts and starts[-1] >= 1, starts

    # an uninterrupted run of the same configuration ends with the same numbers, bit for bit
    ref = run_trial({"defense": "pgd_at", "hp": {"lr": 0.002, "clean_weight": 0.5},
                     "spec": parse(NODE_SPEC), "run_dir": str(tmp_path / "ref")},
                    reporter=LocalReporter(tmp_path / "ref-trial", "ref"))
    row = trials.iloc[0]
    assert (row.clean_acc, row.robust_acc) == (ref.clean_acc, ref.robust_acc)
    assert all(row[f"acc.{k}"] == v for k, v in ref.acc.items())


# ------------------------------------------------------------------ the driver dies
def completed_records(out: Path) -> set[str]:
    done = set()
    for p in (out / "records").glob("*.json"):
        try:
            if json.loads(p.read_text())["status"] == "completed":
                done.add(p.stem)
        except (OSError, ValueError):  # being written
            continue
    return done


def interrupted_with_checkpoint(out: Path) -> set[str]:
    done = completed_records(out)
    return {d.name.split("_")[2] for d in (out / "tune" / "sweep").glob("tune_trial_*")
            if list(d.glob("checkpoint_*/checkpoint.pt")) and d.name.split("_")[2] not in done}


DRIVER_SPEC = {"name": "ft-driver", "epochs": 3, "train_samples": 400, "eval_samples": 60,
               "batch_size": 50, "search": "tpe",
               "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2, "final_eval": "none"},
               # two defenses: the resumed sweep's searcher routes each trial to its own study
               "defenses": {"standard": {"trials": 3}, "pgd_at": {"trials": 1}}}


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_resume_finishes_it(cluster, tmp_path):
    c, _ = cluster
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", DRIVER_SPEC)
    args = ["--no-dashboard", "--address", c.address]
    proc = subprocess.Popen(SWEEP + ["--spec", spec, "--out", str(out)] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sweep_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # kill when one trial has finished and another is between two epoch checkpoints
        if completed_records(out) and interrupted_with_checkpoint(out):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: nothing is flushed on the way out
    proc.communicate()
    killed_at = time.time()
    before = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    finished = {t for t, r in before.items() if r["status"] == "completed"}
    checkpointed = interrupted_with_checkpoint(out)
    assert checkpointed

    resumed = subprocess.run(SWEEP + ["--resume", "--out", str(out)] + args, capture_output=True,
                             text=True, env=sweep_env(), timeout=500)
    assert resumed.returncode == 0, resumed.stderr
    trials = pd.read_csv(out / "trials.csv").set_index("trial_id")
    assert len(trials) == 4 and trials.index.is_unique and (trials.status == "completed").all()
    assert finished <= set(trials.index)
    for trial_id, record in before.items():  # what had finished is what the CSV holds
        if trial_id in finished:
            assert trials.loc[trial_id, "train_seconds"] == pytest.approx(record["train_seconds"])
    for d in (out / "tune" / "sweep").glob("tune_trial_*"):
        trial_id = d.name.split("_")[2]
        after = [r for r in results(d) if r["timestamp"] > killed_at]  # whole seconds
        if trial_id in finished:  # at most reported again from its final checkpoint: no epoch
            assert all(r["start_epoch"] == DRIVER_SPEC["epochs"] for r in after), after
        elif trial_id in checkpointed:  # interrupted: on from its last checkpoint
            assert after and min(r["start_epoch"] for r in after) >= 1, after
    assert trials.defense.value_counts().to_dict() == {"standard": 3, "pgd_at": 1}
    for defense, n in (("standard", 3), ("pgd_at", 1)):
        study = optuna.load_study(study_name=f"ft-driver-{defense}", storage=f"sqlite:///{out / 'optuna.db'}")
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.COMPLETE) == n
        assert optuna.trial.TrialState.RUNNING not in states
        done = {t.user_attrs["trial_id"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
        assert done == set(trials.index[trials.defense == defense])


# ------------------------------------------------------------------ a trial keeps failing
def defense_with_base() -> str | None:
    for name in registry.names():
        cls = registry.get(name)
        if cls.base_model(cls.make_params({})) is not None:
            return name
    return None


@pytest.mark.slow  # ~25 s: three real attempts of a failing trial
def test_trial_that_keeps_failing_is_retried_then_reported_failed(ray_session, tmp_path):
    """A corrupt cached base model fails the trial on every attempt: FailureConfig retries it
    max_failures times, then it is reported failed with its error; the sweep completes."""
    name = defense_with_base()
    if name is None:
        pytest.skip("no registered defense starts from a base model")
    raw = {"name": "ft-retry", "epochs": 1, "train_samples": 200, "eval_samples": 40,
           "batch_size": 50, "max_failures": 1,
           "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2, "final_eval": "none"},
           "defenses": {name: {"trials": 1}, "standard": {"trials": 1}}}
    spec = parse(raw)
    cls = registry.get(name)
    out = tmp_path / "run"
    base = out.resolve() / "bases" / base_key(spec, cls.base_model(cls.make_params({})))
    base.mkdir(parents=True)
    (base / "checkpoint.pt").write_bytes(b"not a checkpoint")
    # a run whose cached base got corrupted, resumed (a fresh sweep would refuse a folder
    # holding files it did not write)
    (out / "spec.json").write_text(json.dumps(spec.model_dump()))

    assert sweep.main(["--resume", "--out", str(out), "--no-dashboard"]) == 0
    trials = pd.read_csv(out / "trials.csv").set_index("defense")
    assert trials.loc[name, "status"] == "failed"
    assert trials.loc[name, "error"]  # the reason, not an empty cell
    assert trials.loc[name, "metric.failures"] == 2  # the first run and its one retry
    assert trials.loc["standard", "status"] == "completed"
