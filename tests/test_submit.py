"""``python -m orchestrator.submit``: a sweep as a Ray job, against a real job server (a local
head with Ray's dashboard, started here), and its bad inputs; the sweep's check that every
node sees its storage path."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import submit

REPO = Path(__file__).resolve().parent.parent


def run_submit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.submit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def answering():
    """An address where something answers HTTP (the checks after the address's run against it;
    nothing is ever submitted there)."""
    import http.server
    import threading

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_that_does_not_answer_is_one_line_within_ten_seconds():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    r = run_submit(f"127.0.0.1:{port}", "--", "--preset", "smoke")
    assert time.monotonic() - started < 10
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray job server answers at http://127.0.0.1:{port}" in lines[0]
    assert "submitted" not in r.stdout


def test_a_server_that_accepts_but_never_replies_times_out_as_one_line():
    with socket.socket() as s:  # listens, never answers: the probe's timeout, not a hang
        s.bind(("127.0.0.1", 0))
        s.listen()
        started = time.monotonic()
        r = run_submit(f"127.0.0.1:{s.getsockname()[1]}", "--", "--preset", "smoke")
    assert time.monotonic() - started < 10 + 5  # the probe's 5 s plus the interpreter's start
    assert r.returncode == 2 and "no Ray job server answers" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_working_directory_over_rays_upload_limit_names_what_to_exclude(tmp_path, answering, capsys):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "orchestrator" / "sweep.py").write_text("# the code")
    with open(tmp_path / "scans.bin", "wb") as f:  # sparse: no disk used
        f.truncate(GCS_STORAGE_MAX_SIZE + 2**20)
    assert submit.main([answering, "--working-dir", str(tmp_path), "--", "--preset", "smoke"]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1
    assert "over Ray's limit of 512 MiB" in line and "scans.bin (513 MiB)" in line and "--exclude" in line
    # excluded, the size check passes; the server, which is no Ray, refuses it in one line
    assert submit.main([answering, "--working-dir", str(tmp_path), "--exclude", "*.bin",
                        "--", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the job server at http://{answering} did not take the job" in err


def test_a_bad_spec_stops_before_any_upload(tmp_path, answering, capsys):
    assert submit.main([answering, "--", "--preset", "smoek"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown preset 'smoek'; valid presets: " + ", ".join(
        __import__("orchestrator.spec", fromlist=["PRESETS"]).PRESETS)
    assert submit.main([answering, "--", "--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: the arguments after -- are not the sweep's: "
                                               "unrecognized arguments: --epochs 3 "
                                               "(see python orchestrator/sweep.py --help)")
    outside = tmp_path / "mine.yaml"
    outside.write_text("defenses: [standard]\n")
    assert submit.main([answering, "--", "--spec", str(outside)]) == 2
    assert "outside the uploaded working directory" in capsys.readouterr().err


def test_the_entrypoint_puts_results_in_the_heads_home_and_specs_relative(tmp_path):
    command, where = submit.sweep_entrypoint(["--preset", "smoke"], REPO)
    assert where == "~/runs/smoke"
    assert command == "python orchestrator/sweep.py --preset smoke --out ~/runs/smoke --no-dashboard"
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / "x.yaml").write_text("defenses: [standard]\n")
    command, where = submit.sweep_entrypoint(
        ["--spec", str(tmp_path / "clusters" / "x.yaml"), "--out=/mnt/nfs/a b", "--no-dashboard"], tmp_path)
    assert where == "/mnt/nfs/a b"
    assert command == "python orchestrator/sweep.py --spec clusters/x.yaml --no-dashboard --out '/mnt/nfs/a b'"


@pytest.fixture(scope="module")
def job_server():
    """A local head with Ray's job server. One node: nodes of a ``Cluster`` on one machine share
    its session folder, where each node's runtime-env agent deletes a job's unpacked working
    directory once its own workers are done with it, under the feet of the driver on another."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    Path(get_ray_address_file(None)).unlink(missing_ok=True)  # no other sweep joins it
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            submit.check_answers(url)
            break
        except submit.SubmitError:
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(1)
    yield c, url
    c.shutdown()


@pytest.mark.slow
def test_the_smoke_preset_runs_as_a_ray_job_to_a_pareto_csv(job_server, tmp_path):
    _, url = job_server
    out = tmp_path / "smoke"
    r = run_submit(url, "--", "--preset", "smoke", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    job = next(line.split()[2].rstrip(":") for line in r.stdout.splitlines() if line.startswith("submitted job"))
    assert f"ray job logs --address {url} --follow {job}" in r.stdout
    assert f"results land in  {out}" in r.stdout
    assert "done:" in r.stdout  # the sweep's own last line, followed from the job's log
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1 and set(front["defense"]) <= {"standard", "pgd_at"}
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(url).get_job_info(job)
    assert info.status == "SUCCEEDED" and info.driver_exit_code == 0
    # what was uploaded left the repository's runs/ and .git out
    assert info.runtime_env["excludes"][:2] == [".git/", "runs/"]


@pytest.mark.slow
def test_a_storage_path_a_node_does_not_see_is_reported_by_address(tmp_path):
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import nodes_not_seeing

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    Path(get_ray_address_file(None)).unlink(missing_ok=True)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        there = tmp_path / "probe"
        there.write_text("x")
        assert nodes_not_seeing(ray, nodes, str(there)) == []
        missing = nodes_not_seeing(ray, nodes, str(tmp_path / "nowhere"))
        assert missing == [n["NodeManagerAddress"] for n in nodes]
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.slow
def test_ctrl_c_stops_the_following_not_the_job(job_server, tmp_path):
    import signal

    from ray.job_submission import JobStatus, JobSubmissionClient

    _, url = job_server
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.submit", url, "--", "--preset", "smoke",
                             "--out", str(tmp_path / "smoke")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    job = None
    for line in proc.stdout:  # wait until it is submitted and following
        if line.startswith("submitted job"):
            job = line.split()[2].rstrip(":")
        if line.startswith("results land in"):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert f"stopped following; job {job} goes on" in err
    client = JobSubmissionClient(url)
    assert client.get_job_status(job) in {JobStatus.PENDING, JobStatus.RUNNING}
    client.stop_job(job)
