"""Cluster-launcher configs: both validate against Ray's own schema, bad ones stop with one
line, and clusters/local.yaml really launches: `ray up`, `ray submit` of the sweep, `ray
rsync-down` of its CSVs, `ray down`, over SSH to this machine."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from orchestrator.cluster import autoscaling_capacity, load_cluster_config, main

ROOT = Path(__file__).resolve().parent.parent
GPU, LOCAL = ROOT / "clusters" / "gpu.yaml", ROOT / "clusters" / "local.yaml"
RAY = str(Path(sys.executable).parent / "ray")


def test_gpu_yaml_passes_rays_schema_and_keeps_the_rules():
    config = load_cluster_config(GPU)
    text = GPU.read_text()
    raw = yaml.safe_load(text)
    types, head = config["available_node_types"], config["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0  # the head has no GPU
    gpu_types = [name for name, t in raw["available_node_types"].items()
                 if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types
    for name in gpu_types:  # min/max workers stated, not left to defaults
        t = raw["available_node_types"][name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert config["file_mounts"] == {"~/saliency-sweep": "."}
    assert any("pip install" in c and "-e ~/saliency-sweep" in c for c in config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in text  # not public
    assert "~/.ray/auth_token" in config["cluster_synced_files"]  # token auth on workers too
    secrets = r"(?i)aws_secret|aws_access_key|secret_access_key|PRIVATE KEY|ssh_private_key|password"
    assert not re.search(secrets, text)


def test_local_yaml_passes_rays_schema():
    config = load_cluster_config(LOCAL)
    assert config["provider"]["type"] == "local" and config["provider"]["head_ip"] == "127.0.0.1"
    assert config["auth"]["ssh_user"] != "root"  # `ray down` runs `ray stop` as this user


def test_autoscaling_capacity_counts_workers_not_yet_started(tmp_path):
    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text(yaml.safe_dump(load_cluster_config(GPU)))
    assert autoscaling_capacity(boot) == {"cpus": 16.0, "gpus": 4.0, "node_cpus": 4.0, "node_gpus": 1.0}
    assert autoscaling_capacity(tmp_path / "none.yaml") == {}


BAD = {
    "no provider": ({"cluster_name": "x"}, "missing required field 'provider'"),
    "no name": ({"provider": {"type": "aws", "region": "us-west-2"}}, "'cluster_name'"),
    "wrong type": ({"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"},
                   "max_workers": "many"}, "max_workers: 'many' is not of type 'integer'"),
    "no node_config": ({"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"},
                       "available_node_types": {"h": {"resources": {}}}, "head_node_type": "h"},
                      "'node_config' is a required property"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_cluster_yaml_one_line_exit_2(case, tmp_path, capsys):
    raw, needle = BAD[case]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# ------------------------------------------------------------------ the real launcher path
@pytest.fixture(scope="module")
def local_cluster_ready():
    """sshd, rsync and the cluster's user, made ready by clusters/setup_local.sh."""
    done = subprocess.run(["bash", str(ROOT / "clusters" / "setup_local.sh")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    reason = (done.stdout.strip().splitlines() or [done.stderr.strip()])[-1]
    if done.returncode == 3:
        pytest.skip(reason)
    assert done.returncode == 0, done.stdout + done.stderr
    # one local cluster at a time on this machine (its name and port are fixed)
    with open("/tmp/saliency-local-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ray_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([RAY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow  # ~70 s: ray up over SSH, submit, rsync, down
def test_ray_up_submit_rsync_down_down(local_cluster_ready, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "epochs": 1, "train_samples": 200, "eval_samples": 50, "batch_size": 50,
        "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": 2, "final_eval": "none"},
        "defenses": {"standard": {"trials": 1}}}))
    config = str(LOCAL.relative_to(ROOT))
    ray_cli("up", "-y", config)
    try:
        ray_cli("rsync-up", config, str(spec), "~/tiny.yaml")
        ray_cli("exec", config, "rm -rf ~/runs/tiny")
        submitted = ray_cli("submit", config, "orchestrator/sweep.py", "--", "--spec", "~/tiny.yaml",
                            "--out", "runs/tiny", "--no-dashboard")
        output = submitted.stdout + submitted.stderr
        # the sweep joined the cluster ray up started (token authentication on), not a new Ray
        assert "joining the Ray cluster at" in output and "(running on this machine)" in output, output
        assert "Token authentication is enabled" in output, output
        fetched = tmp_path / "fetched"
        ray_cli("rsync-down", config, "~/runs/tiny/", str(fetched) + "/")
        # the same sweep as a Ray job through the YAML: the dashboard forwarded over SSH, the
        # head's token fetched, a working directory with the spec in it uploaded
        work = tmp_path / "work"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info"))
        shutil.copy(spec, work / "tiny.yaml")
        ray_cli("exec", config, "rm -rf ~/runs/tiny-job")
        job = subprocess.run([sys.executable, "-m", "orchestrator.submit", config, "--working-dir", str(work),
                              "--", "--spec", str(work / "tiny.yaml"), "--out", "runs/tiny-job"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"})
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "results land in  ~/runs/tiny-job on the cluster's head" in job.stdout
        assert "done:" in job.stdout
        by_job = tmp_path / "by_job"
        ray_cli("rsync-down", config, "~/runs/tiny-job/", str(by_job) + "/")
        assert (by_job / "pareto.csv").is_file()
    finally:
        ray_cli("down", "-y", config)
    trials = pd.read_csv(fetched / "trials.csv")
    assert len(trials) == 1 and trials.status.iloc[0] == "completed"
    assert (fetched / "pareto.csv").is_file() and (fetched / "manifest.json").is_file()
