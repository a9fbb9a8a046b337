"""One Tune run per sweep: ``DefenseRouter`` gives the trials of every defense the cluster's
slots at once while each defense keeps its own Optuna study."""
import pickle
from datetime import datetime

import optuna
import pandas as pd
import pytest
import yaml

from orchestrator import sweep
from orchestrator.spec import SpecError, parse
from orchestrator.tune_adapter import DefenseRouter, make_router

RESULT = {"clean_acc": 0.9, "robust_acc": 0.4}


def studies(folder) -> dict[str, list]:
    storage = f"sqlite:///{folder / 'optuna.db'}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage)}


def test_router_interleaves_defenses_by_budget_and_routes_each_result_to_its_study(tmp_path):
    spec = parse({"name": "route", "search": "random",
                  "defenses": {"standard": {"trials": 2}, "pgd_at": {"trials": 4}, "trades": {"trials": 2}}})
    router = make_router(spec, tmp_path)
    configs = [router.suggest(f"t{i}") for i in range(8)]
    order = [c["defense"] for c in configs]
    assert order[:3] == ["standard", "pgd_at", "trades"]  # a cluster's first slots hold all three
    assert {d: order.count(d) for d in set(order)} == {"standard": 2, "pgd_at": 4, "trades": 2}
    assert all(set(c) == {"defense", "hp"} and c["hp"] for c in configs)
    assert "beta" in configs[2]["hp"] and "beta" not in configs[0]["hp"]  # each its own space
    assert router.suggest("t8") == DefenseRouter.FINISHED

    router.on_trial_complete("t1", RESULT)  # pgd_at's
    found = studies(tmp_path)
    assert [t.state for t in found["route-pgd_at"]].count(optuna.trial.TrialState.COMPLETE) == 1
    assert all(t.state != optuna.trial.TrialState.COMPLETE
               for name in ("route-standard", "route-trades") for t in found[name])

    # Tune saves the router with its experiment and a resumed sweep restores it
    router.save(str(tmp_path / "router.pkl"))
    again = make_router(spec, tmp_path)
    again.restore(str(tmp_path / "router.pkl"))
    assert again.owner("t2") == "trades" and again.suggest("t9") == DefenseRouter.FINISHED
    again.on_trial_complete("t2", RESULT)
    assert [t.state for t in studies(tmp_path)["route-trades"]].count(optuna.trial.TrialState.COMPLETE) == 1
    pickle.loads(pickle.dumps(again))  # and Tune pickles it into tuner.pkl
    # one pickled by the code before start_order (without its fields) still suggests
    older = pickle.loads(pickle.dumps(make_router(spec, tmp_path)))
    for field in ("_longest_first", "_prior", "_clock", "_began", "_seconds"):
        del older.__dict__[field]
    assert pickle.loads(pickle.dumps(older)).suggest("u0")["defense"] == "standard"


def test_a_defense_at_its_own_max_concurrent_waits_for_one_of_its_trials(tmp_path):
    spec = parse({"name": "cap", "search": "random",
                  "defenses": {"standard": {"trials": 1},
                               "pgd_at": {"trials": 3, "resources": {"max_concurrent": 1}}}})
    router = make_router(spec, tmp_path)
    assert router.suggest("a")["defense"] == "standard"
    assert router.suggest("b")["defense"] == "pgd_at"
    assert router.suggest("c") is None   # pgd_at is at its cap, standard's budget is used
    router.on_trial_complete("b", RESULT)
    assert router.suggest("c")["defense"] == "pgd_at"


def test_three_defenses_run_trials_at_overlapping_times(ray_session, tmp_path, capsys):
    raw = {"name": "joint", "epochs": 1, "train_samples": 300, "eval_samples": 50, "batch_size": 50,
           "search": "random",
           # eight slots on the test session's two CPUs: every trial fits at once
           "resources": {"cpus_per_trial": 0.25},
           "threat_model": {"eps": 0.3, "eval_eps": [0.3], "attacks": ["fgsm"], "train_steps": 1,
                            "masking_samples": 0, "final_eval": "none"},
           "defenses": {"standard": {"trials": 2}, "pgd_at": {"trials": 2}, "trades": {"trials": 2}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    rc = sweep.main(["--spec", str(tmp_path / "spec.yaml"), "--out", str(out), "--no-dashboard"])
    assert rc == 0, capsys.readouterr().err
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and (trials.status == "completed").all()
    assert trials.defense.value_counts().to_dict() == {"standard": 2, "pgd_at": 2, "trades": 2}
    spans = [(d, datetime.fromisoformat(s), datetime.fromisoformat(f))
             for d, s, f in zip(trials.defense, trials.started_at, trials.finished_at)]
    overlapping = {frozenset((a[0], b[0])) for a in spans for b in spans
                   if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]}
    assert len(overlapping) >= 2, spans  # at least two pairs of defenses ran side by side
    assert (out / "tune" / sweep.EXPERIMENT).is_dir()
    found = studies(out)
    assert sorted(found) == ["joint-pgd_at", "joint-standard", "joint-trades"]
    for name, ts in found.items():
        assert [t.state for t in ts] == [optuna.trial.TrialState.COMPLETE] * 2, name
        assert {t.user_attrs["trial_id"] for t in ts} == \
            set(trials.trial_id[trials.defense == name.split("-", 1)[1]].astype(str))


def test_adaptive_allocation_gives_the_rest_to_the_defense_on_the_front_and_keeps_floors(tmp_path):
    spec = parse({"name": "adapt", "search": "random", "allocation": "adaptive",
                  "defenses": {"standard": {"trials": 4}, "pgd_at": {"trials": 4}, "trades": {"trials": 3}}})
    router = make_router(spec, tmp_path)
    first = [router.suggest(f"f{i}")["defense"] for i in range(6)]  # the floors: 2, 2 and 2
    assert sorted(first) == ["pgd_at"] * 2 + ["standard"] * 2 + ["trades"] * 2
    # pgd_at's trials make the front; trades is dominated; standard adds a corner of its own
    results = {"pgd_at": {"clean_acc": 0.9, "robust_acc": 0.5}, "trades": {"clean_acc": 0.5, "robust_acc": 0.3},
               "standard": {"clean_acc": 0.95, "robust_acc": 0.05}}
    for i, d in enumerate(first):
        router.on_trial_complete(f"f{i}", {**results[d], "status": "completed"})
    gain = router.contributions()
    assert gain["pgd_at"] > gain["standard"] > 0 == gain["trades"]
    rest = [router.suggest(f"r{i}")["defense"] for i in range(5)]  # 11 in all, 6 given
    assert rest == ["pgd_at"] * 5  # the largest contribution, while results stay as they are
    assert router.suggest("r5") == DefenseRouter.FINISHED
    assert [t.state for t in studies(tmp_path)["adapt-trades"]].count(optuna.trial.TrialState.COMPLETE) == 2


def test_adaptive_allocation_without_results_is_the_fixed_order(tmp_path):
    raw = {"name": "same", "search": "random", "defenses": {"standard": {"trials": 3}, "pgd_at": {"trials": 3}}}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fixed = make_router(parse(raw), tmp_path / "a")
    adaptive = make_router(parse({**raw, "allocation": "adaptive"}), tmp_path / "b")
    assert [fixed.suggest(f"t{i}")["defense"] for i in range(6)] == \
        [adaptive.suggest(f"t{i}")["defense"] for i in range(6)]


class Clock:
    """The router's clock, moved by hand."""
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_longest_first_starts_the_defense_whose_trials_run_longest(tmp_path):
    spec = parse({"name": "lpt", "search": "random", "start_order": "longest_first",
                  "defenses": {"standard": {"trials": 3}, "pgd_at": {"trials": 4}}})
    clock = Clock()
    router = make_router(spec, tmp_path)
    router._clock = clock
    # nothing known yet: every defense's first trials, interleaved by share
    assert [router.suggest(t)["defense"] for t in ("s1", "p1", "p2")] == ["standard", "pgd_at", "pgd_at"]
    clock.now = 5.0
    router.on_trial_complete("p2", RESULT)   # a short pgd_at trial: 5 s
    clock.now = 10.0
    router.on_trial_complete("s1", RESULT)   # standard's: 10 s
    clock.now = 40.0                          # p1 has run 40 s and runs on
    # pgd_at's finished mean (5 s) alone would say standard; its running trial says 40 s
    assert router.expected_seconds("pgd_at") == 40.0 and router.expected_seconds("standard") == 10.0
    assert router.suggest("x")["defense"] == "pgd_at"
    (tmp_path / "i").mkdir()
    fixed = make_router(parse({**spec.model_dump(), "start_order": "interleaved"}), tmp_path / "i")
    assert [fixed.suggest(t)["defense"] for t in ("s1", "p1", "p2", "x")][-1] == "standard"


def test_a_cost_prior_from_an_earlier_run_orders_the_first_trials(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "defense": ["standard", "trades", "pgd_at", "trades"],
                  "status": ["completed", "completed", "completed", "failed"],
                  "started_at": ["2026-12-01T00:00:00+00:00"] * 4,
                  "finished_at": ["2026-12-01T00:00:10+00:00", "2026-12-01T00:01:40+00:00",
                                  "2026-12-01T00:00:50+00:00", "2026-12-01T00:10:00+00:00"]}
                 ).to_csv(earlier / "trials.csv", index=False)
    spec = parse({"name": "prior", "search": "random", "start_order": "longest_first",
                  "cost_prior": str(earlier),
                  "defenses": {"standard": {"trials": 2}, "pgd_at": {"trials": 2}, "trades": {"trials": 2}}})
    router = make_router(spec, tmp_path)
    assert router._prior == {"standard": 10.0, "trades": 100.0, "pgd_at": 50.0}  # the failed one left out
    order = [router.suggest(f"t{i}")["defense"] for i in range(6)]
    assert order == ["trades", "trades", "pgd_at", "pgd_at", "standard", "standard"]

    # a trials.csv without a completed trial (e.g. one of a run that failed) is refused at parse
    pd.read_csv(earlier / "trials.csv").assign(status="failed").to_csv(earlier / "trials.csv", index=False)
    with pytest.raises(SpecError, match="has no completed trial with started_at and finished_at"):
        parse({"start_order": "longest_first", "cost_prior": str(earlier / "trials.csv"),
               "defenses": ["standard"]})
