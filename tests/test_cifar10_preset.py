"""The cifar10 preset (clusters/gpu.yaml): what it holds, its CIFAR-unit search spaces and GPU
shares, the one-line error without --data-root, and an end-to-end run of it on a CPU, on a
tiny CIFAR-format fixture, shrunk through spec overrides."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from defenses.core import registry
from orchestrator.spec import PRESETS, SpecError, build_space, default_space, load, parse
from test_data_models import _write_cifar10

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [sys.executable, str(ROOT / "orchestrator" / "sweep.py")]
EPS = 8 / 255


def corners(space: dict) -> dict[str, list]:
    """Every value a plain-form space can take at its ends: choices, range ends, fixed values."""
    out = {}
    for k, v in space.items():
        out[k] = list(v) if isinstance(v, list) else [v["low"], v["high"]] if isinstance(v, dict) else [v]
    return out


def test_the_preset_is_cifar10_preact_resnet18_at_8_255_with_sgd_cyclic_bf16_and_autoattack():
    spec = load(preset="cifar10")
    assert (spec.dataset, spec.model, spec.data_root) == ("cifar10", "preact_resnet18", None)
    assert spec.threat_model.eps == pytest.approx(EPS)
    assert spec.threat_model.train_precision == "bf16"
    assert spec.threat_model.final_eval == ["standard"]  # AutoAttack standard on the front
    assert spec.threat_model.train_step_size is None and spec.threat_model.train_steps == 10
    assert spec.threat_model.threat_model().step_size == pytest.approx(2 / 255)  # PGD-10 at 2/255
    opt = spec.optimizer
    assert (opt.name, opt.schedule, opt.momentum, opt.weight_decay) == ("sgd", "cyclic", 0.9, 5e-4)
    assert (spec.epochs, spec.batch_size, spec.eval_samples, spec.final_samples) == (15, 128, 1000, 1000)
    assert sorted(spec.defenses) == registry.names()
    assert spec.resources.gpus_per_trial == 1 and spec.resources.gpu_shares


def test_every_defense_gets_its_cifar_space_in_units_of_8_255():
    spec = load(preset="cifar10")
    spaces = {}
    for d in registry.names():
        space, where = default_space(d, "cifar10")
        assert "SPACE_BY_DATASET['cifar10']" in where, d  # every search_spaces file has one
        build_space(spec, d)  # valid for the defense, on preact_resnet18
        spaces[d] = corners(space)
    # SGD's cyclic peaks (0.05-0.2, around the usual 0.1), not MNIST's Adam 5e-4..3e-3
    for d in ("standard", "pgd_at", "trades", "fgsm_rs", "sat"):
        assert spaces[d]["lr"] == [0.05, 0.2], d
    # every hyperparameter in input (ε) units lies in (0, 8/255]
    assert spaces["sat"]["eps0"] == pytest.approx([2 / 255, EPS])   # the paper's ε₀ = 8/255 on top
    assert spaces["sad"]["step"] == pytest.approx([2 / 255, 4 / 255, EPS])
    for v in spaces["sat"]["eps0"] + spaces["sad"]["step"]:
        assert 0 < v <= EPS + 1e-12
    # FGSM's α = alpha_ratio·ε: 6/255-12/255, Wong et al.'s 1.25ε = 10/255 inside
    alphas = [r * EPS for r in spaces["fgsm_rs"]["alpha_ratio"]]
    assert alphas == pytest.approx([6 / 255, 12 / 255]) and alphas[0] < 1.25 * EPS < alphas[1]
    # the MNIST spaces stay what they were (ε = 0.3)
    assert corners(default_space("sat", "mnist5k")[0])["eps0"] == [0.05, 0.3]
    # paper values where the paper gives CIFAR ones; RGB-only options switched on
    assert spaces["sad"]["ratio"] == [0.2, 1.2]                   # SAD Table 5, CIFAR-10 ResNet-18
    assert spaces["gradcam_detector"]["theta"] == [0.0, 0.5]      # θ: an image proportion
    assert "color_reverse" in spaces["gradcam_detector"]["enhancement"]
    assert spaces["feature_squeezing"]["bit_depth"] == [4, 5, 6]  # Xu et al.'s CIFAR: 5 bits
    assert 13 in spaces["feature_squeezing"]["nlm_search"]        # ... and NLM 13-3-2
    assert spaces["trades"]["beta"][0] <= 6 <= spaces["trades"]["beta"][1]  # TRADES' CIFAR β = 6
    assert {"smoothgrad", "integrated_gradients"} <= set(spaces["sat"]["method"])


def test_cheap_defenses_share_a_gpu_and_per_defense_resources_override():
    spec = load(preset="cifar10")
    shares = {d: spec.resources_for(d).gpus_per_trial for d in spec.defenses}
    assert shares == {"standard": 0.25, "fgsm_rs": 0.25, "feature_squeezing": 0.25,
                      "sad": 0.5, "gradcam_detector": 0.5, "saliency_detector": 0.5,
                      "pgd_at": 1.0, "trades": 1.0, "sat": 1.0, "atat": 1.0}
    assert all(spec.resources_for(d).cpus_per_trial == 1 for d in spec.defenses)
    # a defense's own resources win over the share; without gpu_shares nothing is scaled
    raw = copy.deepcopy(PRESETS["cifar10"])
    raw["defenses"] = {"standard": {"resources": {"gpus_per_trial": 0.5, "cpus_per_trial": 2}},
                       "pgd_at": {}}
    own = parse(raw)
    assert (own.resources_for("standard").gpus_per_trial, own.resources_for("standard").cpus_per_trial) == (0.5, 2)
    assert own.resources_for("pgd_at").gpus_per_trial == 1.0
    raw["resources"]["gpu_shares"] = False
    assert parse(raw).resources_for("pgd_at") == parse(raw).resources
    # on a CPU (gpus_per_trial 0) the shares leave 0
    raw["resources"] = {"gpus_per_trial": 0, "gpu_shares": True}
    assert parse(raw).resources_for("pgd_at").gpus_per_trial == 0
    # data-parallel ranks cannot share a GPU: one line naming the defense
    raw = copy.deepcopy(PRESETS["cifar10"])
    raw["resources"]["workers_per_trial"] = 2
    raw["defenses"] = ["standard"]
    with pytest.raises(SpecError) as e:
        parse(raw)
    assert str(e.value).startswith("spec error at defenses.standard.resources: gpus_per_trial=0.25 "
                                   "with workers_per_trial=2")
    assert "\n" not in str(e.value)


def sweep_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_without_data_root_one_line_exit_2_before_ray(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(SWEEP + ["--preset", "cifar10", "--out", str(out), "--no-dashboard"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=sweep_env())
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "--data-root" in err and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert "Ray" not in err and done.stdout == ""
    # nothing written: the dataset is checked before --out is made
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


# The preset's values, shrunk to a CPU minute: two defenses (the fast-AT one and its baseline,
# each with its cifar10 space), one trial each, one epoch on 320 of the fixture's images
# (fgsm_rs keeps 256 of them for its catastrophic-overfitting check);
# small_cnn (3 channels), fp32 attacks (bf16 autocast is for GPUs) and no GPU. The threat
# model (8/255), optimizer and schedule, search spaces and the final cascade (AutoAttack
# standard) stay the preset's.
TINY = {"name": "cifar10-tiny", "epochs": 1, "batch_size": 50, "train_samples": 320,
        "validation_samples": 50, "eval_samples": 40, "final_samples": 40,
        "model": "small_cnn", "trials_per_defense": 1, "search": "random",
        "defenses": ["standard", "fgsm_rs"],
        "threat_model": {"train_precision": "fp32", "curve_samples": 20, "masking_samples": 16},
        "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1}}


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_shrunk_preset(tmp_path: Path, **over) -> tuple[Path, Path]:
    """The cifar10 preset with TINY's (and ``over``'s) values, through orchestrator/sweep.py in a
    process of its own on a fresh local Ray; returns (run folder, data root)."""
    root = tmp_path / "data"
    _write_cifar10(root, n=80)  # 400 training, 80 test images in torchvision's python format
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(merged(merged(PRESETS["cifar10"], TINY), over)))
    out = tmp_path / "out"
    # --address local: never a Ray another sweep on this machine runs
    done = subprocess.run(SWEEP + ["--spec", str(spec_file), "--data-root", str(root), "--out", str(out),
                                   "--no-dashboard", "--address", "local"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=580, env=sweep_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out, root


def check_cifar10_run(out: Path, root: Path, defenses: set[str], final_attack: str) -> None:
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    pareto = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str})
    assert len(trials) == len(defenses) and set(trials.defense) == defenses
    assert (trials.status == "completed").all(), trials.error.tolist()
    assert (trials.dataset == "cifar10").all() and (trials.model == "small_cnn").all()
    assert "robust_acc@8/255" in trials.columns and (trials.n_eval == 40).all()
    assert len(pareto) >= 1 and pareto.final_evaluated.all()
    assert pareto.final_attack.str.startswith(final_attack).all()
    # the searched hyperparameters come from the cifar10 spaces: SGD's lr, α = 0.75-1.5·ε
    assert trials["hp.lr"].between(0.05, 0.2).all()
    if "fgsm_rs" in defenses:
        assert trials["hp.alpha_ratio"].dropna().between(0.75, 1.5).all()
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["spec"]
    assert (s["dataset"], s["model"], s["data_root"]) == ("cifar10", "small_cnn", str(root))
    assert s["threat_model"]["eps"] == pytest.approx(EPS)
    assert (s["optimizer"]["name"], s["optimizer"]["schedule"]) == ("sgd", "cyclic")


@pytest.mark.slow  # ~30 s; the CIFAR loader and preact_resnet18 have fast tests of their own
def test_the_preset_end_to_end_on_a_cifar_format_fixture(tmp_path):
    # one defense, ε = 8/255 only, no masking checks, the final cascade cut to APGD-CE-20: a
    # minute on 2 cores (most of it Ray's start); AutoAttack standard is the slow test below
    out, root = run_shrunk_preset(tmp_path, defenses=["standard"], threat_model={
        "final_eval": ["apgd_ce-20"], "eval_eps": [EPS], "masking_samples": 0})
    check_cifar10_run(out, root, {"standard"}, "apgd_ce-20+earlier")


@pytest.mark.slow
def test_the_preset_end_to_end_with_its_autoattack_final_evaluation(tmp_path):
    # ~5 min on 2 cores: Square-5000 spends its whole budget on the points it cannot break
    out, root = run_shrunk_preset(tmp_path)
    check_cifar10_run(out, root, {"standard", "fgsm_rs"}, "apgd_ce-100+apgd_t-100+fab_t-100+square-5000")
