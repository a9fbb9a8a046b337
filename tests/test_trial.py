"""run_trial from plain Python: determinism, resume, divergence, and the baselines' contract."""
import copy
import datetime

import pytest
import torch

from defenses.core import registry
from defenses.core.base import ThreatModel
from defenses.fgsm_rs import FGSMRS
from orchestrator.records import COMPLETED, FAILED, TrialRecord
from orchestrator.spec import parse
from orchestrator.trial import LocalReporter, run_trial

TINY = {"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 300,
        "eval_samples": 100, "batch_size": 50,
        "threat_model": {"eps": 0.3, "attacks": ["fgsm", "pgd-5"], "train_steps": 2}}


def tiny(**over):
    raw = copy.deepcopy(TINY)
    raw.update(over)
    raw.setdefault("defenses", ["standard"])
    return parse(raw)


def test_run_trial_is_deterministic_on_cpu(tmp_path):
    spec = tiny(defenses=["pgd_at"])
    a = run_trial({"defense": "pgd_at", "hp": {"lr": 1e-3}, "spec": spec, "run_dir": str(tmp_path)})
    b = run_trial({"defense": "pgd_at", "hp": {"lr": 1e-3}, "spec": spec, "run_dir": str(tmp_path)})
    assert a.status == b.status == COMPLETED
    assert (a.clean_acc, a.robust_acc, a.acc) == (b.clean_acc, b.robust_acc, b.acc)


def test_training_the_base_model_does_not_shift_the_trial_random_stream(tmp_path, monkeypatch):
    # The first trial of a run trains the base model (a PGD-AT teacher draws random starts), the
    # next loads it from the cache: both must go on with the same random stream.
    import orchestrator.training as training
    from orchestrator.training import build_setup

    real = training.ensure_base

    def drawing_ensure_base(*args, **kwargs):
        torch.rand(1000)  # what a training with random draws does to the global stream
        return real(*args, **kwargs)

    spec = tiny(defenses=["atat"], train_samples=200)
    draws = []
    for patched in (False, True):
        with monkeypatch.context() as m:
            if patched:
                m.setattr(training, "ensure_base", drawing_ensure_base)
            build_setup(spec, "atat", {}, torch.device("cpu"), tmp_path)
            draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_resumed_trial_ends_where_an_uninterrupted_one_does(tmp_path):
    full = LocalReporter(tmp_path / "full", "full")
    run_trial({"defense": "standard", "hp": {}, "spec": tiny(epochs=2)}, reporter=full)
    # interrupted after epoch 1: a reporter holding the epoch-1 checkpoint, then resumed
    part = LocalReporter(tmp_path / "part", "part")
    run_trial({"defense": "standard", "hp": {}, "spec": tiny(epochs=1)}, reporter=part)
    resumed = run_trial({"defense": "standard", "hp": {}, "spec": tiny(epochs=2)}, reporter=part)
    w_full = torch.load(full.checkpoint_dir / "checkpoint.pt", weights_only=True)["model"]
    w_res = torch.load(part.checkpoint_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert resumed.clean_acc == full.results[-1]["clean_acc"]
    assert [r["epoch"] for r in part.results] == [1, 1, 2, 2]  # resumed at epoch 2 only
    # started_at is the first start's, kept through the checkpoint; finished_at the last end
    first = TrialRecord.from_dict(part.results[1]["record"])
    assert resumed.started_at == first.started_at < first.finished_at < resumed.finished_at
    # the cost goes on from the checkpoint's: the resumed trial paid for both of its runs
    assert 0 < first.cost < resumed.cost and resumed.cost_unit == "cpu_s"
    assert datetime.datetime.fromisoformat(resumed.finished_at).tzinfo == datetime.timezone.utc


def test_per_epoch_reports_then_a_final_record(tmp_path):
    rep = LocalReporter(tmp_path / "r", "r")
    rec = run_trial({"defense": "standard", "hp": {}, "spec": tiny(epochs=2)}, reporter=rep)
    assert [r["status"] for r in rep.results] == ["running", "running", "completed"]
    assert rep.results[-1]["record"]["trial_id"] == rec.trial_id == "r"
    assert rec.epochs == 2 and rec.train_seconds > 0 and list(rec.acc)[:2] == ["fgsm", "pgd-5"]
    # cost: CPU-seconds so far in every report, the final one with the evaluation's
    costs = [r["cost"] for r in rep.results]
    assert 0 < costs[0] < costs[1] < costs[2] == rec.cost and rec.cost_unit == "cpu_s"
    # then the gradient-masking checks' attacks, whose breaks count too
    assert all(k.startswith("check.") for k in list(rec.acc)[2:])


def test_diverging_loss_fails_the_trial_with_its_reason():
    spec = tiny(optimizer={"name": "sgd"})
    rec = run_trial({"defense": "standard", "hp": {"lr": 1e12}, "spec": spec})
    assert rec.status == FAILED and "nan" in rec.error.lower()


@pytest.mark.parametrize("name", registry.names())
def test_clean_accuracy_is_at_least_robust_for_every_defense(name, tmp_path):
    rec = run_trial({"defense": name, "hp": {}, "spec": tiny(defenses=[name]), "run_dir": str(tmp_path)})
    assert rec.status == COMPLETED, rec.error
    assert 0.0 <= rec.robust_acc <= rec.clean_acc <= 1.0
    assert min(rec.acc.values()) == rec.robust_acc  # the cascade's last step is the worst case


def test_fgsm_rs_guard_catches_a_collapse_and_restores_the_best_weights(trained_cnn, mnist):
    model = copy.deepcopy(trained_cnn).train()
    defense = FGSMRS(model, FGSMRS.make_params({}), ThreatModel(eps=0.1))
    holdout = (mnist.test_x[:128], mnist.test_y[:128])
    first = defense.end_epoch(1, holdout)
    best = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # a collapse: the classifier forgets everything
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.arange(10.0))
    second = defense.end_epoch(2, holdout)
    assert first["holdout_pgd_acc"] - second["holdout_pgd_acc"] > 0.2
    assert defense.stop_training and defense.flags() == {"catastrophic_overfitting": True}
    defense.finalize()
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process that sees no CUDA device")
def test_a_trial_given_gpus_without_cuda_fails_in_one_line_instead_of_training_on_the_cpu(tmp_path):
    spec = tiny(resources={"gpus_per_trial": 1})
    with pytest.raises(RuntimeError) as e:
        run_trial({"defense": "standard", "hp": {}, "spec": spec}, LocalReporter(tmp_path, "t"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gpus_per_trial=1 but this process sees no CUDA device")
    assert "set gpus_per_trial: 0" in msg
