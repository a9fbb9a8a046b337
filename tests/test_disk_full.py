"""A full disk at export: the CSVs already there stay intact, the error is one line naming the
folder and the space left, the exit code is non-zero, and a later export completes."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from orchestrator import sweep
from orchestrator.aggregate import cli as aggregate
from orchestrator.records import TrialRecord, save_record
from orchestrator.spec import parse


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (needs root, as in CI's container); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_at_export_keeps_the_csvs_and_says_so(small_fs, capsys):
    run = small_fs / "run"
    for i, (clean, robust) in enumerate([(0.9, 0.1), (0.7, 0.4), (0.5, 0.2)]):
        save_record(run, TrialRecord(f"t{i}", "standard", "mnist5k", "small_cnn", 0,
                                     status="completed", clean_acc=clean, robust_acc=robust,
                                     n_eval=100))
    assert aggregate.main([str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.glob("*.csv")}
    assert set(before) == {"trials.csv", "pareto.csv"}
    capsys.readouterr()

    filler = _fill(small_fs)
    assert aggregate.main([str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write to {run}" in err[0] and "MiB free there" in err[0]
    assert {p.name: p.read_bytes() for p in run.glob("*.csv")} == before
    assert not list(run.glob(".*.tmp"))  # no half-written temp file left behind
    # the sweep's own export says how to finish it once there is room
    spec = parse({"name": "full", "defenses": ["standard"]})
    with pytest.raises(sweep.ExportFailed, match=r"--resume --out .*run"):
        sweep._export(spec, run, time.time())
    assert {p.name: p.read_bytes() for p in run.glob("*.csv")} == before

    filler.unlink()
    sweep._export(spec, run, time.time())
    assert (run / "manifest.json").is_file() and (run / "trials.csv").read_bytes() == before["trials.csv"]
