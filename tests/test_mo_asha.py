"""MO-ASHA: the rung ranking against brute force, the rung decision, and a real sweep in
which it stops a clearly bad trial before its last epoch."""
import itertools

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from orchestrator import sweep
from orchestrator.mo_asha import MOASHA, crowding_distance, rank_order


def dominates(a, b) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


def brute_layers(points: np.ndarray) -> np.ndarray:
    """Non-dominated layers by peeling fronts off one at a time (O(n³), obviously right)."""
    layer, left, k = np.full(len(points), -1), set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        layer[list(front)] = k
        left, k = left - front, k + 1
    return layer


@pytest.mark.parametrize("seed", range(5))
def test_rank_order_sorts_by_layer_then_crowding(seed):
    rng = np.random.default_rng(seed)
    points = np.round(rng.random((30, 3)), 1)  # rounded: ties and duplicates occur
    order = rank_order(points)
    assert sorted(order) == list(range(30))
    layers = brute_layers(points)
    assert list(layers[order]) == sorted(layers)  # layer by layer
    for i, j in itertools.combinations(order, 2):  # i ranked before j: j never dominates i
        assert not dominates(points[j], points[i])
    for k in np.unique(layers):  # within a layer, crowding distance falls
        members = np.flatnonzero(layers == k)
        crowd = dict(zip(members, crowding_distance(points[members])))
        ranked = [crowd[i] for i in order if layers[i] == k]
        assert ranked == sorted(ranked, reverse=True)


def test_crowding_distance_by_hand():
    points = np.array([[0.0, 1.0], [0.2, 0.7], [0.5, 0.5], [1.0, 0.0]])
    # middle ones: (0.5-0.0)/1 + (1.0-0.5)/1 = 1.0 and (1.0-0.2)/1 + (0.7-0.0)/1 = 1.5
    assert list(crowding_distance(points)) == [np.inf, 1.0, 1.5, np.inf]


def test_rungs_and_the_top_share_that_goes_on():
    s = MOASHA(["a", "b"], max_t=10, grace_period=1, reduction_factor=3, keep_nondominated=False)
    assert s.rungs == [1, 3, 9]
    assert s.decide("t1", 1, [0.5, 0.5]) == "CONTINUE"     # alone at its rung
    assert s.decide("t2", 1, [0.4, 0.4]) == "STOP"         # dominated: not in the top ceil(2/3)
    # top 1 of 3: t3 shares the first layer with t1, both extremes of it; the earlier one leads
    assert s.decide("t3", 1, [0.9, 0.1]) == "STOP"
    assert s.decide("t4", 1, [0.6, 0.6]) == "CONTINUE"     # dominates t1: in the top 2 of 4
    assert s.decide("t5", 3, [0.1, 0.1]) == "CONTINUE"     # each rung is ranked on its own
    assert s.stopped == {"t2": 1, "t3": 1}
    assert MOASHA(["a", "b"], max_t=6, grace_period=2, reduction_factor=2).rungs == [2, 4]


def test_a_trial_no_other_dominates_at_its_rung_goes_on_by_default():
    s = MOASHA(["a", "b"], max_t=10, grace_period=1, reduction_factor=3)
    assert s.decide("t1", 1, [0.5, 0.5]) == "CONTINUE"
    assert s.decide("t2", 1, [0.4, 0.4]) == "STOP"         # dominated by t1
    # outside the top ceil(3/3) = 1, but on the rung's front beside t1: the paper's cut stops it
    assert s.decide("t3", 1, [0.9, 0.1]) == "CONTINUE"
    assert s.decide("t4", 1, [0.5, 0.5]) == "CONTINUE"     # equal to t1: on the front as t1 is
    assert s.decide("t5", 1, [0.45, 0.45]) == "STOP"       # dominated, whatever the share
    assert s.stopped == {"t2": 1, "t5": 1}


def test_a_scheduler_pickled_before_keep_nondominated_resumes_with_the_papers_cut():
    import pickle

    old = MOASHA(["a", "b"], max_t=10, grace_period=1, reduction_factor=3)
    del old.keep_nondominated  # as a sweep begun before the option pickled it
    s = pickle.loads(pickle.dumps(old))
    assert s.keep_nondominated is False
    assert s.decide("t1", 1, [0.5, 0.5]) == "CONTINUE"
    assert s.decide("t2", 1, [0.9, 0.1]) == "STOP"  # non-dominated, outside the top 1 of 2
    assert pickle.loads(pickle.dumps(MOASHA(["a", "b"], max_t=10))).keep_nondominated is True


def test_a_minimized_objective_ranks_the_cheaper_trial_first():
    # val.cost so far (device-seconds) minimized: the cheaper of two equally accurate trials goes on
    s = MOASHA(["val.robust_acc", "val.cost"], max_t=10, reduction_factor=2, mode=["max", "min"])
    assert s.decide("dear", 1, [0.5, 20.0]) == "CONTINUE"
    assert s.decide("cheap", 1, [0.5, 10.0]) == "CONTINUE"  # dominates "dear": the top 1 of 2
    assert s.decide("dearer", 1, [0.5, 30.0]) == "STOP"


def test_mo_asha_stops_a_clearly_bad_trial_before_its_last_epoch(ray_session, tmp_path, capsys):
    raw = {"name": "asha", "epochs": 3, "train_samples": 600, "eval_samples": 100, "batch_size": 50,
           "search": "random", "scheduler": {"name": "mo_asha", "grace_period": 1, "reduction_factor": 3},
           # one trial at a time: the good one reaches the rung first, the bad one is judged against it
           "resources": {"max_concurrent": 1},
           "threat_model": {"eps": 0.05, "eval_eps": [0.05], "attacks": ["fgsm"], "train_steps": 1,
                            "masking_samples": 0, "final_eval": "none"},
           "defenses": {"standard": {"trials": 1, "space": {"lr": [0.003]}},
                        # an lr that learns nothing in 3 epochs: chance accuracy on both objectives
                        "pgd_at": {"trials": 1, "space": {"lr": [1e-7], "clean_weight": [0.5]}}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # standard first
    out = tmp_path / "run"
    assert sweep.main(["--spec", str(tmp_path / "spec.yaml"), "--out", str(out), "--no-dashboard"]) == 0, \
        capsys.readouterr().err
    trials = pd.read_csv(out / "trials.csv").set_index("defense")
    good, bad = trials.loc["standard"], trials.loc["pgd_at"]
    assert good.status == "completed" and good.epochs == 3
    assert bad.status == "stopped" and bad.epochs == 1, bad.to_dict()
    assert bad["metric.val.clean_acc"] < 0.3 < good["metric.val.clean_acc"]  # why it was stopped
    assert bad.train_seconds > 0 and bad.started_at and bad.finished_at
    assert set(pd.read_csv(out / "pareto.csv").defense) == {"standard"}  # off the front
    study = optuna.load_study(study_name="asha-pgd_at", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED]
