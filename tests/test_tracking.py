"""Experiment tracking: a real sweep logs every trial to a real MLflow store (a file store in
the test's folder), read back with MLflow's own client; bad tracking settings stop before Ray."""
import math
from pathlib import Path

import pytest
import yaml

from orchestrator import sweep

mlflow = pytest.importorskip("mlflow", reason="tracking needs MLflow: pip install -e '.[dev]'")
from mlflow.tracking import MlflowClient  # noqa: E402

from test_sweep import TINY, no_ray, read_csv, run_bad  # noqa: E402,F401  (fixture)


def _spec(tmp_path: Path, tracking) -> str:
    raw = {**TINY, "name": "tracked", "epochs": 2,
           "threat_model": {**TINY["threat_model"], "final_eval": ["apgd_ce-5"]},
           "defenses": {"standard": {"trials": 1}}, "tracking": tracking}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_every_trial_is_an_mlflow_run_with_its_csv_numbers(ray_session, tmp_path):
    store = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "out"
    spec = _spec(tmp_path, {"mlflow": {"tracking_uri": store}})
    assert sweep.main(["--spec", spec, "--out", str(out), "--no-dashboard"]) == 0
    trials = read_csv(out / "trials.csv").set_index("trial_id")

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tracked")  # the spec's name
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials.index)
    for run in runs:
        row = trials.loc[run.data.tags["trial_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["defense"] == "standard"
        assert float(run.data.params["hp.lr"]) == pytest.approx(row["hp.lr"])
        assert run.data.params["epochs"] == "2" and run.data.tags["checkpoint"] == row.checkpoint
        # the latest values are the CSV's, final numbers included
        for col in ("clean_acc", "robust_acc", "robust_acc_ci_low", "n_eval"):
            assert run.data.metrics[col] == pytest.approx(row[col]), col
        assert run.data.tags["final_evaluated"] == str(bool(row.final_evaluated))
        # the training loss per epoch, step = epoch
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss] == [1, 2] and all(math.isfinite(m.value) for m in loss)
        # one trial is its own front: re-evaluated, its search-time number first, the final last
        assert row.final_evaluated
        robust = [m.value for m in client.get_metric_history(run.info.run_id, "robust_acc")]
        assert robust[0] == pytest.approx(row.robust_acc_search) and robust[-1] == pytest.approx(row.robust_acc)
        curve = [k for k in run.data.metrics if k.startswith("robust_acc_at_")]
        assert curve, sorted(run.data.metrics)  # robust_acc@<eps> under a key MLflow takes


@pytest.mark.parametrize("tracking, needle", [
    ({"wandb": {"project": "x"}}, "unknown key 'tracking.wandb'"),
    ({"mlflow": {}}, "tracking.mlflow.tracking_uri"),
    ({"mlflow": {"tracking_uri": "nosuchscheme://x"}}, "MLflow cannot open 'nosuchscheme://x'"),
])
def test_bad_tracking_settings_are_one_line_before_ray(no_ray, tmp_path, capsys, tracking, needle):
    err = run_bad(capsys, ["--spec", _spec(tmp_path, tracking), "--out", str(tmp_path / "o")])
    assert needle in err
