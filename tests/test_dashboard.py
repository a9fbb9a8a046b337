"""The dashboard driven through its Tune-independent methods (and duck-typed Tune hooks):
no Ray cluster is started."""
import importlib.util
import inspect
import io
import math
from types import SimpleNamespace

import pytest
import ray.cloudpickle
from ray.tune import Callback
from rich.console import Console

from orchestrator.dashboard import Dashboard, short_reason
from orchestrator.records import COMPLETED, FAILED, TrialRecord

HAS_AGGREGATE = importlib.util.find_spec("orchestrator.aggregate") is not None


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(live: bool, total: int = 6):
    console = Console(file=io.StringIO(), force_terminal=live, width=120, color_system=None)
    dash = Dashboard(total, cpus_per_trial=2, gpus_per_trial=0.5, cluster_cpus=8,
                     cluster_gpus=2, console=console, live=live)
    dash._clock = clock = FakeClock()
    dash._t0 = clock.now
    return dash, console, clock


def record(tid, defense, hp, clean, robust, status=COMPLETED, flags=None, error=""):
    return TrialRecord(tid, defense, "mnist", "smallcnn", 0, status=status, hp=hp,
                       clean_acc=clean, robust_acc=robust, robust_attack="pgd-40",
                       flags=flags or {}, epochs=4, train_seconds=12.5, error=error)


def epoch(n, **extra):
    return {"epoch": n, "epochs": 4, "loss": 0.5, "status": "running", "clean_acc": 0.9,
            "robust_acc": math.nan, **extra}


def drive(dash, clock):
    """Two pgd_at trials complete, one fgsm_rs trial is flagged CO, one fails, one runs."""
    dash.begin_defense("pgd_at", ["lr", "beta"])
    for tid, lr, clean, robust in [("a_00000", 0.001, 0.97, 0.81), ("a_00001", 0.01, 0.99, 0.70)]:
        hp = {"lr": lr, "beta": 6.0, "unshown": 1}
        dash.trial_started(tid, "pgd_at", hp)
        clock.now += 10
        dash.trial_progress(tid, epoch(1))
        dash.trial_progress(tid, epoch(4, status=COMPLETED,
                                      record=record(tid, "pgd_at", hp, clean, robust).to_dict()))
    dash.begin_defense("fgsm_rs", ["alpha"])
    dash.trial_started("b_00000", "fgsm_rs", {"alpha": 1.25})
    dash.trial_progress("b_00000", epoch(2, **{"flag.catastrophic_overfitting": True}))
    dash.trial_finished("b_00000", record("b_00000", "fgsm_rs", {"alpha": 1.25}, 0.995, 0.0,
                                          flags={"catastrophic_overfitting": True}))
    dash.trial_started("b_00001", "fgsm_rs", {"alpha": 2.0})
    dash.trial_errored("b_00001", "RuntimeError: CUDA out of memory")
    dash.trial_started("b_00002", "fgsm_rs", {"alpha": 0.5})
    dash.trial_progress("b_00002", epoch(3))


def text_of(dash) -> str:
    out = Console(file=io.StringIO(), width=120, color_system=None)
    out.print(dash.render())
    return out.file.getvalue()


def test_plain_mode_prints_one_line_per_finished_trial():
    dash, console, clock = make(live=False)
    drive(dash, clock)
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 4          # 3 finished + 1 failed; nothing for epochs or the runner
    assert lines[0].startswith("[1/6] pgd_at a_00000 completed clean=97.0% robust=81.0% (pgd-40)")
    assert "hp: lr=0.001 beta=6" in lines[0] and "unshown" not in lines[0]
    assert "catastrophic_overfitting" in lines[2]
    assert lines[3].startswith("[4/6] fgsm_rs b_00001 failed: RuntimeError: CUDA out of memory")


def test_repeated_end_events_print_once_and_keep_the_first_reason():
    dash, console, _ = make(live=False)
    dash.trial_started("t1", "trades", {})
    failed = record("t1", "trades", {}, math.nan, math.nan, status=FAILED,
                    error="Traceback (most recent call last):\n  File x\nValueError: lr < 0\n")
    dash.trial_finished("t1", failed)
    dash.trial_errored("t1", "TuneError: trial errored")     # Tune's own error follows
    dash.on_trial_complete(iteration=1, trials=[], trial=SimpleNamespace(
        trial_id="t1", config={}, last_result={"record": failed.to_dict()}))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and "t1 failed: ValueError: lr < 0" in lines[0]


def test_header_adds_up_each_running_defense_s_own_resources():
    """A defense with its own resources (defenses.<d>.resources, gpu_shares) counts what its
    trials hold, not the spec-wide figure."""
    dash, _, clock = make(live=True)
    dash.per_defense = {"feature_squeezing": (1, 0.25)}
    dash.begin_defense("pgd_at", ["lr"])
    dash.trial_started("p0", "pgd_at", {"lr": 0.1})
    dash.trial_started("f0", "feature_squeezing", {"bit_depth": 1})
    dash.trial_started("f1", "feature_squeezing", {"bit_depth": 2})
    for tid in ("p0", "f0", "f1"):
        dash.trial_progress(tid, epoch(1))
    header = " ".join(text_of(dash).split("\n\n")[0].split())  # the header wraps at 120 columns
    assert "running 3" in header and "CPU 4/8" in header and "GPU 1/2" in header, header


def test_live_render_shows_trials_flags_front_and_failures():
    dash, console, clock = make(live=True)
    drive(dash, clock)
    text = text_of(dash)
    assert "pgd_at" in text and "fgsm_rs" in text
    assert "done 3 · running 1 · failed 1 · total 6" in text
    assert "CPU 2/8" in text and "GPU 0.5/2" in text
    assert "CO" in text and "CO = catastrophic_overfitting" in text
    assert "lr=0.001 beta=6" in text and "alpha=0.5" in text
    assert "RuntimeError: CUDA out of memory" in text
    assert console.file.getvalue() == ""    # live mode prints no plain lines
    if HAS_AGGREGATE:
        front = text.split("Pareto front")[1].split("Failures")[0]
        # (97/81), (99/70), (99.5/0): each trades clean for robust, none dominates another
        assert "a_00000" in front and "b_00000" in front and "a_00001" in front


def test_eta_appears_after_the_first_finished_trial():
    dash, _, clock = make(live=True, total=4)
    dash.begin_defense("pgd_at", ["lr"])
    dash.trial_started("t1", "pgd_at", {"lr": 0.1})
    dash.trial_started("t2", "pgd_at", {"lr": 0.2})
    assert "ETA —" in text_of(dash)
    clock.now += 60
    dash.trial_finished("t1", record("t1", "pgd_at", {"lr": 0.1}, 0.9, 0.5))
    # mean 60 s; t2 has ~0 s left, 2 trials not started, 2 ran at once -> 60 s left
    assert "ETA 0:01:00" in text_of(dash)


def test_long_sweeps_keep_the_table_short():
    dash, _, clock = make(live=True, total=30)
    dash.begin_defense("standard", [])
    for i in range(25):
        clock.now += 1
        dash.trial_started(f"t{i:02d}", "standard", {})
        dash.trial_errored(f"t{i:02d}", f"ValueError: bad {i}")
    text = text_of(dash)
    assert "… 5 more" in text
    assert "t24" in text and "t00 " not in text   # the most recent first


def test_start_stop_twice_and_context_manager():
    dash, _, _ = make(live=True)
    dash.start()
    dash.start()
    dash.stop()
    dash.stop()
    with make(live=True)[0] as d:
        d.begin_defense("pgd_at", ["lr"])
    d.stop()


def test_tune_hooks_accept_duck_typed_trials(tmp_path):
    dash, console, _ = make(live=False)
    dash.begin_defense("trades", ["beta"])
    ok = SimpleNamespace(trial_id="x_00000", config={"hp": {"beta": 6.0}})
    dash.on_trial_start(iteration=1, trials=[ok], trial=ok)
    dash.on_trial_result(iteration=2, trials=[ok], trial=ok, result=epoch(1))
    rec = record("x_00000", "trades", {"beta": 6.0}, 0.9, 0.6)
    ok.last_result = {"record": rec.to_dict()}
    dash.on_trial_complete(iteration=3, trials=[ok], trial=ok)   # record from last_result

    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1 (occurred at 2026-11-22_10-00-00)\n"
        "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1, actor_id=ab)\n"
        "  File \"trial.py\", line 3, in run_trial\n    raise ValueError('beta must be > 0')\n"
        "ValueError: beta must be > 0\n")
    bad = SimpleNamespace(trial_id="x_00001", config={"hp": {"beta": -1}},
                          error_file=str(error_file))
    dash.on_trial_start(iteration=4, trials=[ok, bad], trial=bad)
    dash.on_trial_error(iteration=5, trials=[ok, bad], trial=bad)

    stuck = SimpleNamespace(trial_id="x_00002", config={"hp": {"beta": 1.0}})
    dash.on_trial_start(iteration=6, trials=[ok, bad, stuck], trial=stuck)
    dash.on_experiment_end(trials=[ok, bad, stuck])
    dash.on_trial_start(iteration=7, trials=[], trial=object())   # a bad trial is only logged

    lines = console.file.getvalue().splitlines()
    assert len(lines) == 3
    assert "x_00000 completed" in lines[0]
    assert "x_00001 failed: ValueError: beta must be > 0" in lines[1]
    assert "x_00002 stopped" in lines[2]


def test_hook_signatures_match_ray_callback():
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error",
                 "on_experiment_end"):
        ours = list(inspect.signature(getattr(Dashboard, name)).parameters)
        ray_s = list(inspect.signature(getattr(Callback, name)).parameters)
        assert ours == ray_s, name


def test_dashboard_survives_tuner_pickling():
    dash, _, clock = make(live=True)
    drive(dash, clock)
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(dash))   # Tuner writes tuner.pkl
    assert copy.total_trials == 6 and copy.live is True
    copy.begin_defense("pgd_at", ["lr"])
    copy.stop()


@pytest.mark.parametrize("text,reason", [
    ("Failure # 1 (occurred at x)\nTraceback (most recent call last):\n  File a\n"
     "KeyError: 'lr'\n\nFailure # 2 (occurred at y)\nray::f()\nRuntimeError: second\n",
     "RuntimeError: second"),
    ("Failure # 1 (occurred at x)\nThe actor died unexpectedly before finishing this task.\n"
     "\tclass_name: ImplicitFunc\n", "The actor died unexpectedly before finishing this task."),
    ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n\x1b[1mactor gone\x1b[0m", "actor gone"),
    ("plain message", "plain message"),
    ("", ""),
])
def test_short_reason(text, reason):
    assert short_reason(text) == reason


def test_a_flag_is_red_where_its_defense_declares_it_severe():
    from orchestrator.dashboard import _flag_marker

    assert _flag_marker("catastrophic_overfitting", "fgsm_rs") == ("CO", "bold red")
    assert _flag_marker("blackbox_beats_whitebox", "pgd_at") == ("BBW", "bold yellow")
    assert _flag_marker("catastrophic_overfitting", "not_a_defense") == ("CO", "bold yellow")
