"""What every command of the orchestrator shares: exit codes, the bad-input exception, and an
argparse whose usage errors are one line like every other input error.

Exit codes: 0 done; 1 results could not be written (a full disk); 2 bad input, said in one line
before anything expensive runs; 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129
SIGHUP), with everything finished kept and the resume command printed."""
from __future__ import annotations

import argparse
import sys

EXIT_EXPORT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """One line saying what is wrong and how to fix it; the command exits with EXIT_BAD_INPUT."""


def complain(prog: str, message: str) -> int:
    """Print ``prog: error: message`` on stderr; returns EXIT_BAD_INPUT for ``return``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ``BadInput`` (one line, "see --help") instead of printing usage:
    the command reports it as it reports any other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see --help)")


def add_device_options(parser: argparse.ArgumentParser, threads: int = 1) -> None:
    """``--device`` and ``--threads`` for the experiment and benchmark scripts (``device_of``)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads (default: {threads})")


def device_of(args: argparse.Namespace):
    """The ``torch.device`` of ``--device`` with ``--threads`` set; ``BadInput`` for a device
    this process cannot use (torch is imported here: the aggregator's CLI stays torch-free)."""
    import torch

    if args.threads < 1:
        raise BadInput(f"--threads={args.threads} must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BadInput(f"--device {args.device!r} is no device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {args.device}: this process sees no CUDA device "
                       f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadInput(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_with_device(parser: argparse.ArgumentParser, argv=None):
    """(args, torch.device) of a script given ``add_device_options``; a device this process
    cannot use is one line and exit code 2, before anything is loaded."""
    args = parser.parse_args(argv)
    try:
        return args, device_of(args)
    except BadInput as e:
        sys.exit(complain(parser.prog, str(e)))


def trial_resources(device, threads: int) -> dict:
    """A spec's ``resources`` that make ``run_trial`` train on ``device`` (from ``device_of``)
    with ``threads``: it sets its threads from cpus_per_trial and, holding a GPU, takes the
    current CUDA device (set here to ``device``'s index when it names one)."""
    import torch

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return {"cpus_per_trial": threads, "gpus_per_trial": 1.0 if device.type == "cuda" else 0.0}
