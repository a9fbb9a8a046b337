"""The CLI plumbing every command shares (orchestrator/cli.py): one-line usage errors and the
scripts' --device / --threads."""
from __future__ import annotations

import argparse

import pytest
import torch

from orchestrator.cli import BadInput, OneLineParser, add_device_options, device_of


def test_a_usage_error_is_one_line_bad_input():
    p = OneLineParser(prog="x")
    p.add_argument("--n", type=int)
    with pytest.raises(BadInput) as e:
        p.parse_args(["--n", "many"])
    assert "\n" not in str(e.value) and str(e.value).endswith("(see --help)")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_device_options(p, threads=2)
    return p.parse_args(list(argv))


def test_device_and_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert device_of(_args()) == torch.device("cpu") and torch.get_num_threads() == 2
        assert device_of(_args("--device", "cpu", "--threads", "1")).type == "cpu"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(BadInput, match="--threads=0 must be at least 1"):
        device_of(_args("--threads", "0"))
    with pytest.raises(BadInput, match="is no device; use cpu, cuda or cuda:N"):
        device_of(_args("--device", "gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInput, match="--device cuda: this process sees no CUDA device"):
        device_of(_args("--device", "cuda"))
