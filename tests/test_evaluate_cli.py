"""python -m orchestrator.evaluate: a checkpoint re-evaluated, bad input as one line with exit
code 2, and the sweep's final evaluation of the front."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defenses.evaluation import masking
import pandas as pd

from orchestrator import evaluate as cli
from orchestrator.aggregate import merge_runs
from orchestrator.export import export_all
from orchestrator.records import TrialRecord, load_records, save_record
from orchestrator.spec import parse
from orchestrator.training import build_setup, save_checkpoint, train

SPEC = {"name": "cli", "dataset": "mnist5k", "model": "small_cnn", "epochs": 1,
        "train_samples": 100, "eval_samples": 20, "final_samples": 20, "batch_size": 50,
        "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2, "eval_eps": [0.1],
                         "masking_samples": 8, "final_eval": ["fgsm", "pgd-3"]},
        "defenses": ["standard"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A run dir (spec.json) holding one trial checkpoint of a barely trained standard model."""
    run_dir = tmp_path_factory.mktemp("run")
    spec = parse(SPEC)
    (run_dir / "spec.json").write_text(json.dumps(spec.model_dump()))
    s = build_setup(spec, "standard", {}, torch.device("cpu"), run_dir)
    seconds = train(s, 1)
    folder = run_dir / "trials" / "t0" / "checkpoint"
    save_checkpoint(folder, s, 1, seconds)
    return run_dir, folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("evaluate: error: ")
    return err[0]


def test_checkpoint_is_evaluated_at_every_eps_with_masking_flags(run, tmp_path, capsys):
    _, ckpt = run
    out = tmp_path / "report.json"
    code = cli.main([str(ckpt), "--attacks", "fgsm,pgd-3", "--eps", "0.3,0.1", "--samples", "20",
                     "--masking-samples", "8", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "defense standard on mnist5k/small_cnn" in text and "gradient-masking flags" in text
    assert [line.split()[0] for line in text.splitlines()[2:4]] == ["0.3", "0.1"]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"0.3", "0.1"}
    assert {"robust_acc@0.3", "acc.pgd-3@0.3", "robust_acc@0.1"} <= set(report["columns"])
    assert set(report["flags"]) == set(masking.FLAGS)
    r = report["results"]["0.3"]
    assert r["n"] == 20 and r["clean_acc"] >= r["robust_acc"] == r["acc"]["pgd-3"]


def test_the_spec_next_to_the_checkpoint_gives_the_defaults(run):
    """No option: the run's spec.json decides attacks, ε curve, samples and masking."""
    _, ckpt = run
    s = cli.restore(ckpt / "checkpoint.pt")
    espec = cli.eval_spec(s)
    assert espec.eps == (0.3, 0.1) and espec.attacks == ("fgsm",)
    assert espec.masking.samples == 8 and espec.masking.large_eps == 0.5
    assert len(cli.eval_data(s, None)[1]) == 20
    assert cli.eval_spec(s, ["standard"], [8 / 255], 0).masking is None


@pytest.mark.parametrize("args,match", [
    (["--attacks", "bogus"], "unknown attack or preset 'bogus'; valid attacks: fgsm"),
    (["--attacks", "pgd-20,apgd_ce-10x2"], "only apgd_t, fab_t take a target count"),
    (["--preset", "strong"], "unknown preset 'strong'; valid presets: fast, standard, reduced, adaptive, paper"),
    (["--attacks", "fgsm", "--preset", "fast"], "not both"),
    (["--eps", "1.5"], "eps=1.5 outside [0,1]"),
    (["--eps", "0.3,-0.1"], "outside [0,1]"),
    (["--eps", "abc"], "not a number"),
    (["--norm", "L2"], "does not support the L2 threat model; it supports: Linf"),
    (["--dataset", "cifar10"], "trained on 'mnist5k', but --dataset says dataset 'cifar10'"),
    (["--model", "preact_resnet18"], "but --model says model 'preact_resnet18'"),
    (["--samples", "0"], "--samples=0 must be positive"),
    (["--bogus-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(run, capsys, args, match):
    _, ckpt = run
    assert cli.main([str(ckpt), *args]) == 2
    assert match in one_error_line(capsys)


def test_bad_checkpoints_are_one_line_and_exit_2(run, tmp_path, capsys):
    run_dir, ckpt = run
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert "not found" in one_error_line(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert cli.main([str(junk)]) == 2
    assert "unreadable" in one_error_line(capsys)
    # the meta says small_cnn but the weights are of another shape: it does not fit the model
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key] = torch.zeros(3, 3)
    bad = run_dir / "trials" / "bad" / "checkpoint.pt"
    bad.parent.mkdir(parents=True)
    torch.save(state, bad)
    assert cli.main([str(bad)]) == 2
    assert "does not fit the 'small_cnn' model" in one_error_line(capsys)
    # a spec for another dataset than the checkpoint's
    other = tmp_path / "cifar.yaml"
    other.write_text("dataset: cifar10\nmodel: small_cnn\ndefenses: [standard]\n")
    assert cli.main([str(ckpt), "--spec", str(other)]) == 2
    assert "but the spec says dataset 'cifar10'" in one_error_line(capsys)


def test_final_evaluation_reevaluates_the_front_and_keeps_search_numbers(run, tmp_path):
    _, ckpt = run
    run_dir = tmp_path / "final"
    spec = parse(SPEC)
    (run_dir).mkdir()
    # "a": search-time numbers far above what the barely trained model can hold
    save_record(run_dir, TrialRecord("a", "standard", "mnist5k", "small_cnn", 0, status="completed",
                                     clean_acc=0.97, robust_acc=0.8, acc={"fgsm": 0.8}, n_eval=20,
                                     checkpoint=str(ckpt), flags={"catastrophic_overfitting": False}))
    # "h": honest numbers, no checkpoint (cannot be re-evaluated: kept as it is)
    save_record(run_dir, TrialRecord("h", "standard", "mnist5k", "small_cnn", 0, status="completed",
                                     clean_acc=0.95, robust_acc=0.3, acc={"fgsm": 0.3}, n_eval=20))
    export_all(merge_runs([run_dir]), run_dir)
    assert set(pd.read_csv(run_dir / "pareto.csv").trial_id) == {"a"}
    done = cli.final_evaluation(run_dir, spec)
    recs = {r.trial_id: r for r in load_records(run_dir)}
    assert done == ["a"]
    a = recs["a"]
    assert a.final_evaluated and a.robust_acc_search == 0.8 and a.n_eval == 20
    assert a.final_attack.startswith("fgsm+pgd-3") and a.robust_acc < 0.3
    assert list(a.acc)[:2] == ["fgsm", "pgd-3"] and "robust_acc@0.1" in a.curve
    assert set(masking.FLAGS) <= set(a.flags) and "catastrophic_overfitting" in a.flags
    assert not recs["h"].final_evaluated and recs["h"].robust_acc == 0.3
    # the fronts are recomputed from the final numbers: "a" has dropped off
    export_all(merge_runs([run_dir]), run_dir)
    pareto = pd.read_csv(run_dir / "pareto.csv")
    assert set(pareto.trial_id) == {"h"}
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    assert trials.loc["a", "final_evaluated"] and not trials.loc["h", "final_evaluated"]
    assert trials.loc["a", "robust_acc_search"] == 0.8 and trials.loc["a", "n_eval"] == 20


def test_json_never_replaces_a_file_without_force(run, tmp_path, capsys):
    _, ckpt = run
    out = tmp_path / "kept.json"
    out.write_text("precious")
    assert cli.main([str(ckpt), "--attacks", "fgsm", "--json", str(out)]) == 2
    line = one_error_line(capsys)
    assert "kept.json already exists" in line and "--force" in line
    assert out.read_text() == "precious"


def test_final_evaluation_keeps_what_the_search_broke(run, trained_cnn, tmp_path):
    """The search-time evaluation's broken points, stored in the checkpoint, stay broken in the
    final one: the final number is the worst case over both evaluations."""
    run_dir, _ = run
    spec = parse(SPEC)
    s = build_setup(spec, "standard", {}, torch.device("cpu"), run_dir)
    s.defense.model.load_state_dict(trained_cnn.state_dict())  # ≈97 % clean, robust at ε = 0.1

    def final(broken):
        folder = tmp_path / f"ckpt{len(broken)}"
        save_checkpoint(folder, s, 1, 0.0, broken=broken)
        rec = TrialRecord("k", "standard", "mnist5k", "small_cnn", 0, status="completed",
                          clean_acc=0.9, robust_acc=0.0, n_eval=20, checkpoint=str(folder))
        return TrialRecord.from_dict(cli.reevaluate(rec.to_dict(), spec.model_dump(),
                                                    str(run_dir), ["fgsm"]))

    alone = final({})
    assert alone.clean_acc > 0.8 and alone.curve["robust_acc@0.1"] > 0
    everything = {0.3: torch.ones(20, dtype=torch.bool), 0.1: torch.ones(20, dtype=torch.bool)}
    out = final(everything)
    assert out.final_evaluated and out.clean_acc == alone.clean_acc
    assert out.robust_acc == 0.0 and out.curve["robust_acc@0.1"] == 0.0
    assert "earlier" in out.robust_attack.split("+")


def test_final_evaluation_none_opts_out(run):
    spec = parse({**SPEC, "threat_model": {**SPEC["threat_model"], "final_eval": "none"}})
    assert spec.threat_model.final_eval == []
    assert cli.final_evaluation(run[0], spec) == []
    assert cli.with_eval_options(parse(SPEC), "none").threat_model.final_eval == []
