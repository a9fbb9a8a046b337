"""The benchmark harness runs end to end in its tiny mode and writes ratio tables (not a timed
test: the numbers of the tiny mode mean nothing, only that they are produced and recorded)."""
from __future__ import annotations

import re

from bench import run as bench_run

RATIO = re.compile(r"\d+\.\d\d× \(\d+\.\d\d–\d+\.\d\d\)")


def test_tiny_b1_b5_print_ratios_and_rewrite_markdown(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    assert bench_run.main(["--tiny", "--only", "b1,b5", "--md", str(md)]) == 0
    out = capsys.readouterr().out
    assert RATIO.search(out), out
    assert "step / floor" in out and "load average" in out
    text = md.read_text()
    assert "hand-written text" in text
    for key in ("b1", "b5"):
        assert text.count(f"<!-- bench:{key} -->") == 1 and text.count(f"<!-- /bench:{key} -->") == 1
    assert RATIO.search(text)


def test_rewrite_replaces_a_block_in_place(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("head\n\n<!-- bench:b5 -->\nold\n<!-- /bench:b5 -->\n\ntail\n")
    bench_run.rewrite(md, "b5", "new table")
    bench_run.rewrite(md, "b3", "appended")
    text = md.read_text()
    assert "old" not in text and "new table" in text
    assert text.index("head") < text.index("new table") < text.index("tail") < text.index("appended")
    assert text.count("<!-- bench:b5 -->") == 1


def test_unknown_benchmark_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench_run.main(["--only", "b9", "--no-write"])
    assert e.value.code == 2
    assert "unknown benchmark 'b9'" in capsys.readouterr().err


def test_b8_accounts_each_trial_process():
    """B8's per-process reading of a Tune run: two slots, process 1 starts at 10 s (the fill)
    and runs two trials with a 0.5 s turnaround, process 2 starts at 12 s; a third slot is
    never used. Started at once, the run would take the longer of the two slots' lives."""
    from bench.b8_cluster import Run

    r = Run([(10.0, 4.0, 1), (12.0, 2.0, 2), (14.5, 3.0, 1)], wall=18.0)
    assert r.fill() == 12.0
    assert r.gaps() == [0.5]
    assert r.started_together() == 7.5  # process 1: 10 -> 17.5
    # slots 1 and 2 from their first trial (8 + 6 s), the unused one once both had started
    assert r.up_seconds(3) == 8.0 + 6.0 + (18.0 - 12.0)
