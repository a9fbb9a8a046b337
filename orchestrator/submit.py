"""Run a sweep on a Ray cluster as a Ray job: ``python -m orchestrator.submit ADDRESS_OR_CLUSTER_YAML
[--no-wait] [--exclude PATTERN] -- <orchestrator/sweep.py arguments>``.

ADDRESS is the cluster's job server (Ray's dashboard, port 8265 by default): ``http://host:8265``
or ``host:8265``. A cluster YAML (``clusters/gpu.yaml``) is reached the way Ray's docs do it for
the cluster launcher: ``ray dashboard`` forwards the head's dashboard port over SSH for as long
as this command runs.

The working directory (this repository) is packaged by Ray with ``EXCLUDES`` left out (runs,
data, checkpoints, .git) and run on the head as ``python orchestrator/sweep.py ...``, so the
job survives this terminal (unlike ``ray submit`` without ``--tmux``). The sweep's arguments
are checked here first, with the sweep's own parser and spec validation: a bad spec costs no
upload. A relative ``--out`` (and the default ``runs/<spec name>``) lands under the head's home
directory, where ``ray submit`` puts it too; the sweep itself checks on the cluster that its
storage path is one every node sees. Prints the job id, the command that follows its log, and
where the results land; then follows the log until the job ends (``--no-wait``: returns at
once; Ctrl-C stops the following, not the job) and exits with the sweep's exit code."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput, OneLineParser

REPO = Path(__file__).resolve().parent.parent
# What never goes to the cluster (gitignore syntax, relative to the working directory): results,
# datasets, model files and history. Ray adds the working directory's .gitignore and .rayignore.
EXCLUDES = [".git/", "runs/", "data/", "mlruns/", "checkpoints/", "*.pt", "*.pth", "*.ckpt",
            "*.tar.gz", "*.zip", "**/__pycache__/", ".pytest_cache/", "*.egg-info/"]
PROBE_TIMEOUT_S = 5.0   # a job server that does not answer within this is taken as down
DASHBOARD_PORT = 8265
AGENT_WAIT_S = 60.0     # how long a freshly started head may take to offer a job agent


class SubmitError(BadInput):
    """A submission that cannot go: one line, exit code 2, nothing uploaded."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, sweep_args = argv[:cut], argv[cut + 1:]
    p = OneLineParser(prog="python -m orchestrator.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="the job server (http://host:8265, host:8265) or a cluster YAML")
    p.add_argument("--no-wait", action="store_true", help="return once submitted; do not follow the log")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="more paths to leave out of the upload (gitignore syntax; repeatable)")
    p.add_argument("--working-dir", default=str(REPO), help="what is uploaded (default: this repository)")
    return p.parse_args(argv), sweep_args


# ---------------------------------------------------------------- the sweep's arguments
def sweep_entrypoint(sweep_args: list[str], working_dir: Path) -> tuple[str, str]:
    """The job's shell command and the results folder it writes on the head, after checking the
    arguments and the spec as the sweep would (its own parser and loader)."""
    from orchestrator import sweep
    from orchestrator.spec import load

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage block: we say one line
            args = sweep.parse_args(sweep_args)
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or ["?"])[-1].split("error: ", 1)[-1]
        raise SubmitError(f"the arguments after -- are not the sweep's: {reason} "
                          "(see python orchestrator/sweep.py --help)") from None
    if args.resume and not args.out:
        raise SubmitError("--resume needs --out DIR: the run directory on the cluster to continue")
    if args.spec:
        spec_path = Path(args.spec).resolve()
        if not spec_path.is_relative_to(working_dir.resolve()):
            raise SubmitError(f"spec file {args.spec} is outside the uploaded working directory "
                              f"{working_dir}; move it into it (e.g. specs/)")
    name = load(args.spec, args.preset).name if not args.resume else None
    out = args.out or f"runs/{name}"
    rest = _replace_value(sweep_args, "--out", None)
    if args.spec:
        rest = _replace_value(rest, "--spec", str(Path(args.spec).resolve().relative_to(working_dir.resolve())))
    # a relative folder would land in Ray's temporary copy of the working directory: put it in
    # the head's home, where `ray submit` puts it (tilde left unquoted so the shell expands it)
    where = out if out.startswith(("/", "~")) else f"~/{out}"
    out_word = "~/" + shlex.quote(where[2:]) if where.startswith("~/") else shlex.quote(where)
    words = ["python", "orchestrator/sweep.py", *map(shlex.quote, rest), "--out", out_word]
    if "--no-dashboard" not in rest:
        words.append("--no-dashboard")
    return " ".join(words), where


def _replace_value(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag``'s value replaced (``None``: the flag dropped)."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            out += [flag, value] if value is not None else []
            skip = True
        elif a.startswith(flag + "="):
            out += [f"{flag}={value}"] if value is not None else []
        else:
            out.append(a)
    return out


# ---------------------------------------------------------------- the working directory
def upload_size(working_dir: Path, excludes: list[str]) -> tuple[int, list[tuple[int, str]]]:
    """Bytes Ray would zip from ``working_dir`` with ``excludes`` (and the folder's .gitignore /
    .rayignore, as Ray reads them), and the largest top-level entries."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    sizes: dict[str, int] = {}

    def count(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(working_dir).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size

    _dir_travel(working_dir, [_get_excludes(working_dir, excludes)], count,
                include_gitignore=os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE") != "1")
    return sum(sizes.values()), sorted(((s, k) for k, s in sizes.items()), reverse=True)


def check_upload(working_dir: Path, excludes: list[str]) -> None:
    """Ray refuses a package above its gRPC message limit after zipping it; say so first, with
    what to leave out. The unzipped size is compared: an upper bound of what Ray sends."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    if not working_dir.is_dir():
        raise SubmitError(f"working directory {working_dir} is not a folder")
    total, biggest = upload_size(working_dir, excludes)
    if total >= GCS_STORAGE_MAX_SIZE:
        top = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for size, name in biggest[:3])
        raise SubmitError(f"working directory {working_dir} holds {total / 2**20:.0f} MiB to upload, "
                          f"over Ray's limit of {GCS_STORAGE_MAX_SIZE / 2**20:.0f} MiB; largest: {top}; "
                          "leave them out with --exclude PATTERN (or .rayignore), or move them out")


# ---------------------------------------------------------------- the job server
def job_server_url(target: str) -> str:
    url = target if "://" in target else f"http://{target}"
    return url.rstrip("/")


def check_answers(url: str) -> None:
    """A job server that does not answer is one line within PROBE_TIMEOUT_S, not a hang. Any
    HTTP reply counts as an answer (with token authentication, the token is checked later)."""
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, socket.timeout, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(f"no Ray job server answers at {url} ({reason}); start the cluster with "
                          f"Ray's dashboard (pip install 'ray[default]'; port {DASHBOARD_PORT} unless "
                          "--dashboard-port), or pass the cluster YAML") from None


def use_cluster_token(cluster_yaml: Path) -> None:
    """A launcher cluster with token authentication (clusters/*.yaml make one on the head,
    ~/.ray/auth_token) takes jobs only with that token: unless RAY_AUTH_TOKEN is set here, it
    is read from the head over SSH (``ray exec``) into this process's environment, before Ray
    is imported here (Ray reads its authentication settings once)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    done = subprocess.run(["ray", "exec", str(cluster_yaml), "cat ~/.ray/auth_token 2>/dev/null || true"],
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    token = lines[-1].strip() if lines else ""
    if done.returncode != 0:
        raise SubmitError(f"cluster {cluster_yaml}: its head could not be reached over SSH "
                          f"(ray exec exit {done.returncode}); is it up (ray up {cluster_yaml})?")
    if token and " " not in token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def forwarded(cluster_yaml: Path) -> Iterator[str]:
    """The head's dashboard of a launcher cluster on a local port, through ``ray dashboard``'s
    SSH forward, for as long as the block runs."""
    from orchestrator.cluster import load_cluster_config

    load_cluster_config(cluster_yaml)  # one line for a broken config, before SSH
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["ray", "dashboard", "--port", str(port), "--remote-port",
                             str(DASHBOARD_PORT), str(cluster_yaml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                check_answers(url)
                break
            except SubmitError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SubmitError(f"cluster {cluster_yaml}: its dashboard could not be reached "
                                      f"through `ray dashboard {cluster_yaml}`; is the cluster up "
                                      f"(ray up {cluster_yaml})?") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()


def submit(url: str, entrypoint: str, working_dir: Path, excludes: list[str]) -> str:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + AGENT_WAIT_S
    try:
        client = JobSubmissionClient(url)
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint,
                                         runtime_env={"working_dir": str(working_dir), "excludes": excludes})
            except RuntimeError as e:  # a head that has just started has no job agent yet
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    except Exception as e:  # another HTTP service on that port, a refused token, a failed upload
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SubmitError(f"the job server at {url} did not take the job ({type(e).__name__}: "
                          f"{reason}); is it a Ray cluster's dashboard (port {DASHBOARD_PORT})?") from None


def follow(url: str, job_id: str) -> int:
    """Print the job's log as it comes; the sweep's exit code (1 for a job that failed without one)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while (info := client.get_job_info(job_id)).status not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                JobStatus.STOPPED}:
        time.sleep(1)
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args, sweep_args = parse_args(argv)
        working_dir = Path(args.working_dir).resolve()
        excludes = EXCLUDES + args.exclude
        target = Path(args.target)
        is_yaml = target.suffix in (".yaml", ".yml")
        if is_yaml and not target.is_file():
            raise SubmitError(f"cluster config {target} not found")
        if is_yaml:
            use_cluster_token(target)
        else:  # first: a server that does not answer is said within seconds
            check_answers(job_server_url(args.target))
        entrypoint, results = sweep_entrypoint(sweep_args, working_dir)
        check_upload(working_dir, excludes)
        with (forwarded(target) if is_yaml else contextlib.nullcontext(job_server_url(args.target))) as url:
            job_id = submit(url, entrypoint, working_dir, excludes)
            shown = str(target) if is_yaml else url
            print(f"submitted job {job_id}: {entrypoint}")
            print(f"follow its log:  ray job logs --address {url} --follow {job_id}"
                  + (f"   (with `ray dashboard {target}` running)" if is_yaml else ""))
            print(f"stop it:         ray job stop --address {url} {job_id}")
            fetch = (f"ray rsync-down {target} '{results}/' runs/" if is_yaml
                     else f"on the head of {shown}")
            print(f"results land in  {results} on the cluster's head ({fetch})")
            if args.no_wait:
                return 0
            try:
                return follow(url, job_id)
            except KeyboardInterrupt:  # the job is the cluster's now: only the following stops
                print(f"\nstopped following; job {job_id} goes on (follow or stop it with the "
                      "commands above)", file=sys.stderr)
                return EXIT_INTERRUPTED
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
