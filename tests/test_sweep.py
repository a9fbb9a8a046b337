"""The sweep CLI: the smoke preset through real Ray Tune + Optuna, bad input, Ctrl-C, resume."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from orchestrator import outdir, sweep
from orchestrator.aggregate import pareto_front

ROOT = Path(__file__).resolve().parent.parent
TINY = {"name": "tiny", "epochs": 1, "train_samples": 200, "eval_samples": 50, "batch_size": 50,
        "threat_model": {"eps": 0.3, "attacks": ["fgsm", "pgd-3"], "train_steps": 2,
                         "final_eval": "none"}}


def read_csv(path):
    # Tune's trial ids are hex: "7e123456" would otherwise be read as the float 7e123456
    return pd.read_csv(path, dtype={"trial_id": str})


def write_spec(tmp_path, **over):
    raw = {**TINY, **over}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must stop before Ray starts: make starting it an error."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("ray.init called for bad input")
    monkeypatch.setattr(ray, "init", refuse)


def run_bad(capsys, argv):
    rc = sweep.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_smoke_preset_through_ray_tune_and_optuna(ray_session, tmp_path, capsys):
    out = tmp_path / "smoke"
    assert sweep.main(["--preset", "smoke", "--out", str(out), "--no-dashboard"]) == 0
    stdout = capsys.readouterr().out
    trials = read_csv(out / "trials.csv")
    pareto = read_csv(out / "pareto.csv")
    assert len(trials) == 4 and set(trials.defense) == {"standard", "pgd_at"}
    for col in ["trial_id", "defense", "status", "clean_acc", "robust_acc", "robust_attack",
                "clean_acc_ci_low", "robust_acc_ci_high", "n_eval", "robust_acc_search",
                "final_attack", "final_evaluated", "on_front_within_ci",
                "train_seconds", "checkpoint", "hp.lr", "hp.clean_weight",
                # every trial could be on a front here, so acc.* are the final cascade's
                "acc.apgd_ce-50", "acc.apgd_t-50x3", "error"]:
        assert col in trials.columns, col
    assert (trials.status == "completed").all()
    # the final evaluation ran (as Ray tasks) on every trial that could be on a front
    assert pareto.final_evaluated.all() and (pareto.n_eval == 200).all()
    assert pareto.final_attack.str.startswith("apgd_ce-50+apgd_t-50x3").all()
    assert all(Path(p, "checkpoint.pt").is_file() for p in trials.checkpoint)
    # pareto.csv holds exactly the non-dominated trials, robust_acc descending, one knee
    front = pareto_front(trials, ["clean_acc", "robust_acc"])
    assert sorted(pareto.trial_id) == sorted(front.trial_id)
    assert list(pareto.robust_acc) == sorted(pareto.robust_acc, reverse=True)
    assert pareto.is_knee.sum() == 1
    assert (out / "pareto.png").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["name"] == "smoke" and manifest["seeds"] == [0]
    # the Optuna study lives in SQLite in the run dir, one study per defense
    study = optuna.load_study(study_name="smoke-pgd_at", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 2 and len(study.best_trials) >= 1
    assert study.metric_names == ["clean_acc", "robust_acc"]  # optuna-dashboard's axis labels
    # each Optuna trial leads back to its row of trials.csv, its record and its checkpoint
    rows = trials.set_index("trial_id")
    for t in study.trials:
        row = rows.loc[t.user_attrs["trial_id"]]
        assert row.defense == "pgd_at" and t.user_attrs["checkpoint"] == row.checkpoint
        assert json.loads(Path(t.user_attrs["record"]).read_text())["trial_id"] == row.name
    assert stdout.count("completed clean=") == 4  # plain dashboard: one line per trial


def test_cost_as_a_third_objective(ray_session, tmp_path, capsys):
    """objectives [clean_acc, robust_acc, cost]: a cost per trial, the 3-D front in
    pareto.csv, the studies minimizing cost, the manifest's hypervolume, each trial's cost printed."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path, defenses={"standard": {"trials": 2}, "pgd_at": {"trials": 2}},
                      objectives=["clean_acc", "robust_acc", "cost"])
    assert sweep.main(["--spec", spec, "--out", str(out), "--no-dashboard"]) == 0
    trials, pareto = read_csv(out / "trials.csv"), read_csv(out / "pareto.csv")
    assert (trials.status == "completed").all() and (trials.cost > 0).all()
    assert (trials.cost_unit == "cpu_s").all()
    objectives = ["clean_acc", "robust_acc", "cost"]
    assert sorted(pareto.trial_id) == sorted(pareto_front(trials, objectives).trial_id)
    assert pareto.is_knee.sum() == 1
    study = optuna.load_study(study_name="tiny-pgd_at", storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2 + [optuna.study.StudyDirection.MINIMIZE]
    cost = trials.set_index("trial_id").cost
    assert all(t.values[2] == pytest.approx(cost[t.user_attrs["trial_id"]]) for t in study.trials)
    front = json.loads((out / "manifest.json").read_text())["extra"]["front"]
    assert front["objectives"] == objectives and front["size"] == len(pareto) and front["hypervolume"] > 0
    assert front["reference"][2] == pytest.approx(1.1 * trials.cost.max())
    assert capsys.readouterr().out.count(" cpu_s ") == 4  # the plain dashboard's lines


def test_nan_trial_is_failed_and_the_sweep_goes_on(ray_session, tmp_path):
    spec = write_spec(tmp_path, optimizer={"name": "sgd"},
                      defenses={"standard": {"trials": 2, "space": {"lr": [1e12, 1e-2]}}},
                      search="random")
    out = tmp_path / "out"
    assert sweep.main(["--spec", spec, "--out", str(out), "--no-dashboard"]) == 0
    trials = read_csv(out / "trials.csv")
    assert len(trials) == 2
    failed = trials[trials.status == "failed"]
    assert len(failed) >= 1 and failed.error.str.contains("nan").all()
    pareto = read_csv(out / "pareto.csv")
    assert set(pareto.trial_id) <= set(trials[trials.status == "completed"].trial_id)


@pytest.mark.parametrize("over,needle", [
    ({"defenses": ["standard"], "epoch": 2}, "did you mean 'epochs'"),
    ({"defenses": ["standard"], "threat_model": {"eps": 2}}, "threat_model.eps"),
    ({"defenses": ["nope"]}, "registered defenses"),
    ({"defenses": ["standard"], "resources": {"cpus_per_trial": 4096}}, "cpus_per_trial=4096"),
    ({"defenses": ["standard"], "resources": {"gpus_per_trial": 64}}, "gpus_per_trial=64"),
    # early stopping and objectives (TINY trains 1 epoch: grace_period 1 is not below it)
    ({"defenses": ["standard"], "scheduler": {"name": "hyperband"}}, "'none' or 'mo_asha'"),
    ({"defenses": ["standard"], "scheduler": {"name": "mo_asha"}}, "grace_period=1 must be below epochs=1"),
    ({"defenses": ["standard"], "epochs": 3, "scheduler": {"name": "mo_asha", "reduction_factor": 1}},
     "reduction_factor must be ≥ 2"),
    ({"defenses": ["standard"], "epochs": 3, "scheduler": {"name": "mo_asha", "keep_nondominated": "maybe"}},
     "scheduler.keep_nondominated"),
    ({"defenses": ["standard"], "objectives": ["robust_acc"]}, "at least two"),
    ({"defenses": ["standard"], "objectives": ["robust_acc", "robust_acc"]}, "listed twice"),
    ({"defenses": ["standard"], "objectives": ["clean_acc", "speed"]},
     "unknown objective 'speed'; valid objectives: clean_acc, robust_acc, cost"),
    ({"defenses": ["standard"], "objectives": ["clean_acc", "cots"]}, "did you mean 'cost'?"),
    ({"defenses": ["standard"], "objectives": ["cost"]}, "at least two"),
    ({"defenses": ["standard"], "objectives": ["clean_acc", "cost", "cost"]}, "'cost' is listed twice"),
    ({"defenses": ["standard"], "allocation": "greedy"}, "'fixed' or 'adaptive'"),
    ({"defenses": ["standard"], "start_order": "lpt"}, "'interleaved' or 'longest_first'"),
    ({"defenses": ["standard"], "cost_prior": "/"}, "only with start_order: longest_first"),
    ({"defenses": ["standard"], "start_order": "longest_first", "cost_prior": "/no/such/run"},
     "no trials.csv at /no/such/run; give an earlier run's folder"),
])
def test_bad_input_exits_2_before_ray(no_ray, tmp_path, capsys, over, needle):
    err = run_bad(capsys, ["--spec", write_spec(tmp_path, **over), "--out", str(tmp_path / "o")])
    assert needle in err
    assert not (tmp_path / "o" / "spec.json").exists()


def test_missing_cifar_files_say_how_to_get_them(no_ray, tmp_path, capsys):
    spec = write_spec(tmp_path, defenses=["standard"], dataset="cifar10", model="preact_resnet18")
    err = run_bad(capsys, ["--spec", spec, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "cifar-10-python.tar.gz" in err


def test_earlier_run_is_never_overwritten_without_resume(no_ray, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "records").mkdir(parents=True)
    (out / "spec.json").write_text('{"kept": true}')
    (out / "trials.csv").write_text("precious")
    err = run_bad(capsys, ["--preset", "smoke", "--out", str(out)])
    assert "--resume" in err
    assert (out / "trials.csv").read_text() == "precious"
    assert (out / "spec.json").read_text() == '{"kept": true}'


def test_a_folder_with_files_the_sweep_did_not_write_is_left_alone(no_ray, tmp_path, capsys):
    """e.g. the output of ``aggregate --out DIR`` passed as a fresh sweep's --out."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "trials.csv").write_text("precious")
    err = run_bad(capsys, ["--preset", "smoke", "--out", str(out)])
    assert "trials.csv" in err and "--resume" in err and "another --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["trials.csv"]
    assert (out / "trials.csv").read_text() == "precious"


def test_a_second_sweep_on_a_locked_folder_names_the_holder(no_ray, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / outdir.LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-01T00:00:00+00:00"}))
        err = run_bad(capsys, ["--preset", "smoke", "--out", str(out)])
        assert f"another sweep writes {out}" in err and f"pid {holder.pid}" in err
        assert (out / outdir.LOCK_FILE).exists()  # the holder keeps its lock
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / outdir.LOCK_FILE).write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "started": "2026-12-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="orchestrator.outdir"):
        with outdir.RunLock(tmp_path):
            assert json.loads((tmp_path / outdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text
    assert not (tmp_path / outdir.LOCK_FILE).exists()  # released on exit


def test_resume_with_other_code_warns_in_one_line(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"storage_path": "x", "git_sha": "0" * 40, "versions": {"torch": "0.0.1"}}))
    line = sweep.code_changes(tmp_path)
    assert line.startswith("warning: resuming") and "git 00000000 ->" in line
    assert "torch 0.0.1 ->" in line and "\n" not in line
    (tmp_path / "run.json").write_text(json.dumps({"storage_path": "x", **sweep.code_version()}))
    assert sweep.code_changes(tmp_path) is None


def test_resume_without_an_earlier_run(no_ray, tmp_path, capsys):
    err = run_bad(capsys, ["--resume", "--out", str(tmp_path / "y")])
    assert "holds no earlier run" in err


def test_unwritable_output_dir(no_ray, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = run_bad(capsys, ["--preset", "smoke", "--out", str(blocker / "sub")])
    assert "not writable" in err


def test_unwritable_storage_path_stops_before_ray(no_ray, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "o"
    err = run_bad(capsys, ["--preset", "smoke", "--out", str(out), "--storage-path", str(blocker / "tune")])
    assert f"storage path {blocker / 'tune'} is not writable" in err and "--storage-path" in err
    assert not (out / "spec.json").exists()  # nothing of a run written


def test_unreachable_address_fails_fast(no_ray, tmp_path, capsys):
    t0 = time.monotonic()
    err = run_bad(capsys, ["--preset", "smoke", "--out", str(tmp_path / "o"), "--address", "127.0.0.1:1"])
    assert "cannot reach" in err and time.monotonic() - t0 < 10


def test_unknown_preset_and_missing_spec(no_ray, tmp_path, capsys):
    assert "valid presets" in run_bad(capsys, ["--preset", "huge", "--out", str(tmp_path / "o")])
    assert "not found" in run_bad(capsys, ["--spec", str(tmp_path / "no.yaml"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("sig, code", [
    # ~70 s each: two sweeps in their own processes, each with its own local Ray
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # the same path as SIGTERM's
    pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow),
    pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),  # a closed SSH session
])
def test_ctrl_c_and_sigterm_leave_valid_csvs_and_resume_finishes(tmp_path, sig, code):
    """A real SIGINT / SIGTERM mid-sweep (separate process, its own local Ray), then --resume:
    exit 128 + the signal, no stack dump, the resume command printed, nothing finished lost or
    run again."""
    spec = write_spec(tmp_path, defenses={"standard": {"trials": 2}, "pgd_at": {"trials": 2}},
                      epochs=2, train_samples=600)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "orchestrator" / "sweep.py"), "--spec", spec, "--out", str(out),
           "--no-dashboard", "--address", "local"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "records").glob("*.json"))) >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err
    assert f"--resume --out {out}" in err and "SIGTERM received" not in err
    assert "Token authentication" not in err  # Ray's notice for a new local cluster
    assert "Traceback" not in err
    first = read_csv(out / "trials.csv")
    assert 1 <= len(first) < 4 and (first.status == "completed").all()
    # a node that died while writing: every checkpoint of the unfinished trials cut short
    cut = set()
    for f in (out / "tune").rglob("checkpoint.pt"):
        trial = f.parent.parent.name.split("_")[2]  # tune_trial_<id>_<n>_<hp>...
        if trial not in set(first.trial_id):
            f.write_bytes(f.read_bytes()[:64])
            cut.add(trial)

    done = subprocess.run(cmd[:-2] + ["--resume", "--address", "local"], capture_output=True,
                          text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    final = read_csv(out / "trials.csv")
    assert len(final) == 4 and final.trial_id.is_unique
    assert set(first.trial_id) <= set(final.trial_id)  # nothing finished was run again
    assert (final.status == "completed").all()
    warned = final.set_index("trial_id").warning.fillna("")
    assert all("unreadable checkpoint" in warned[t] for t in cut)  # started over, and said so


def test_optuna_trials_orphaned_by_a_killed_driver_are_closed(tmp_path):
    # A driver killed between Optuna's ask (stored at once) and Tune's searcher-state save
    # leaves a RUNNING trial that nobody will tell: closed as FAIL once the defense finished.
    from orchestrator.spec import parse
    from orchestrator.tune_adapter import close_orphan_trials

    spec = parse({"name": "orph", "defenses": ["standard"]})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="orph-standard", storage=storage,
                                directions=["maximize", "maximize"])
    done = study.ask()
    study.tell(done, [0.9, 0.1])
    study.ask()  # the orphan
    assert close_orphan_trials(spec, "standard", tmp_path) == 1
    states = [t.state for t in optuna.load_study(study_name="orph-standard", storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert close_orphan_trials(spec, "standard", tmp_path) == 0
    assert close_orphan_trials(spec, "trades", tmp_path) == 0  # no such study: nothing to do


@pytest.mark.parametrize("search", ["tpe", "nsga2"])
def test_model_based_samplers_leave_their_random_start_within_the_budget(tmp_path, search):
    # With Optuna's defaults (TPE: 10 random trials, NSGA-II: generations of 50) a 20-trial
    # study is mostly or wholly random search; the sweep sizes both to the defense's budget.
    import optuna

    from orchestrator.spec import parse
    from orchestrator.tune_adapter import make_searcher

    spec = parse({"name": "budget", "search": search, "defenses": {"pgd_at": {"trials": 20}, "standard": {"trials": 400}}})
    small = make_searcher(spec, "pgd_at", tmp_path)._sampler
    large = make_searcher(spec, "standard", tmp_path)._sampler
    if search == "tpe":
        assert isinstance(small, optuna.samplers.TPESampler)
        assert small._n_startup_trials == 6 and large._n_startup_trials == 10
    else:
        assert isinstance(small, optuna.samplers.NSGAIISampler)
        assert small._population_size == 5 and large._population_size == 50


@pytest.mark.parametrize("search", ["tpe", "nsga2", "random"])
def test_every_searcher_survives_the_pickles_tune_makes_of_it(tmp_path, search):
    # Tune pickles the searcher into tuner.pkl (cloudpickle) and into its checkpoints
    # (OptunaSearch.save: pickle of its __dict__); Optuna 5.1's NSGA-II holds a thread lock
    import pickle

    import optuna
    from ray import cloudpickle

    from orchestrator.spec import parse
    from orchestrator.tune_adapter import make_searcher

    spec = parse({"name": "pickles", "search": search, "defenses": ["standard"]})
    searcher = make_searcher(spec, "standard", tmp_path)
    searcher.save(str(tmp_path / "searcher.pkl"))
    for copy in (cloudpickle.loads(cloudpickle.dumps(searcher)),
                 pickle.loads((tmp_path / "searcher.pkl").read_bytes())["_sampler"]):
        sampler = getattr(copy, "_sampler", copy)
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        for _ in range(3):  # a genetic sampler takes its lock on every suggestion
            trial = study.ask({"u": optuna.distributions.FloatDistribution(0.0, 1.0)})
            study.tell(trial, [trial.params["u"], 1 - trial.params["u"]])


def test_each_defense_study_draws_its_own_points(tmp_path):
    # one seed per (spec seed, defense): studies of different defenses do not start from the
    # same points of their search spaces, and a rerun draws the same ones again
    import optuna

    from orchestrator.spec import parse
    from orchestrator.tune_adapter import make_searcher

    spec = parse({"name": "seeds", "search": "random", "defenses": ["pgd_at", "trades"]})

    def first_draw(defense: str, folder) -> float:
        study = optuna.create_study(sampler=make_searcher(spec, defense, folder)._sampler)
        return study.ask({"u": optuna.distributions.FloatDistribution(0.0, 1.0)}).params["u"]

    assert first_draw("pgd_at", tmp_path) != first_draw("trades", tmp_path)
    (tmp_path / "again").mkdir()
    assert first_draw("pgd_at", tmp_path) == first_draw("pgd_at", tmp_path / "again")


def test_ctrl_c_after_a_tune_fit_reaches_the_sweep():
    """Tune leaves its SIGINT handler installed after a finished run: the final evaluation
    after the fits must still stop on the first Ctrl-C / SIGTERM (as KeyboardInterrupt)."""
    import signal

    from ray.tune.tune import _setup_signal_catching  # what Tuner.fit installs (Ray 2.60)

    from orchestrator.sweep import fit_restoring_sigint

    before = signal.getsignal(signal.SIGINT)
    fit_restoring_sigint(_setup_signal_catching)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_the_private_tune_access_is_checked_on_this_ray_version(tmp_path):
    # use_live_callbacks reaches into Tuner._local_tuner; a Ray upgrade must re-check it
    import ray
    from ray import tune

    from orchestrator.sweep import TUNE_PRIVATE_API_CHECKED, use_live_callbacks

    assert ray.__version__.startswith(TUNE_PRIVATE_API_CHECKED + "."), (
        f"Ray {ray.__version__}: re-check orchestrator.sweep.use_live_callbacks and "
        "orchestrator.tune_adapter.RecordedSearch, then update "
        "TUNE_PRIVATE_API_CHECKED")
    tuner = tune.Tuner(lambda config: None,
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="x"))
    live = [tune.Callback()]
    use_live_callbacks(tuner, live)
    assert tuner._local_tuner.get_run_config().callbacks is live


def test_rays_notice_of_local_token_authentication_is_dropped():
    """Ray's own warning functions (2.60): the notice that a new local cluster has token
    authentication on is dropped; the warning that authentication is off still reaches the user."""
    from ray._private.authentication import authentication_token_setup as ray_auth

    sweep.quiet_local_token_notice()
    said: list[str] = []
    seen = logging.Handler()
    seen.emit = lambda record: said.append(record.getMessage())
    ray_auth.logger.addHandler(seen)  # Ray's loggers do not propagate to the root's caplog
    try:
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
    finally:
        ray_auth.logger.removeHandler(seen)
    assert not any("is enabled" in m for m in said) and any("is disabled" in m for m in said)
