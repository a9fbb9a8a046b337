"""Live terminal view of a sweep, fed by a Ray Tune callback.

On a terminal it draws a rich ``Live`` view (header, trial table, Pareto front, failures);
otherwise (CI, ``nohup``, a log file) it prints one plain line per finished trial.

The Tune hooks only translate Tune's objects into four plain methods — ``trial_started``,
``trial_progress``, ``trial_finished``, ``trial_errored`` — so the view can be driven (and
tested) without Ray.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ray.tune import Callback
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from defenses.core import registry
from orchestrator.records import COMPLETED, FAILED, RUNNING, TrialRecord
from orchestrator.stats import accuracy_interval

logger = logging.getLogger(__name__)

# A trial Tune ended without a final record (early-stopped by a scheduler, or still running
# when its experiment ended, e.g. on Ctrl-C): finished, but neither a result nor a failure.
STOPPED = "stopped"

MAX_ROWS = 20          # trial table rows; the rest is summarised as "… N more"
MAX_FAILURES = 5       # failure lines shown under the table
REASON_WIDTH = 100     # characters of a failure reason in the live view
PLAIN_REASON_WIDTH = 300

_STATUS_STYLE = {RUNNING: "cyan", COMPLETED: "green", FAILED: "bold red", STOPPED: "yellow"}
# Flags everybody should notice at a glance; any other true flag gets its initials.
# The line of a traceback that names the exception, e.g. "ValueError: lr must be > 0".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")   # Ray colours "ray::ImplicitFunc.train()" in tracebacks


@dataclass
class _Row:
    trial_id: str
    defense: str
    hp: dict[str, Any]
    started: float
    status: str = RUNNING
    epoch: int = 0
    epochs: int = 0
    clean: float = math.nan
    robust: float = math.nan
    n: int = 0                     # test points behind clean/robust (their ± is its interval)
    attack: str = ""
    flags: dict[str, bool] = field(default_factory=dict)
    seconds: float = math.nan      # training time from the record, when there is one
    ended: float | None = None
    reason: str = ""
    record: TrialRecord | None = None


def _guarded(hook: Callable) -> Callable:
    """A drawing bug must not abort a sweep of many GPU-hours: log it and carry on."""
    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            hook(self, *args, **kwargs)
        except Exception:
            logger.exception("dashboard: %s failed; the sweep goes on", hook.__name__)
    return wrapper


class Dashboard(Callback):
    """Rich Live view of a sweep (one Tuner per defense), or plain lines when not a TTY."""

    def __init__(self, total_trials: int, cpus_per_trial: float, gpus_per_trial: float,
                 cluster_cpus: float, cluster_gpus: float, console: Console | None = None,
                 live: bool | None = None,
                 per_defense: dict[str, tuple[float, float]] | None = None,
                 objectives: Sequence[str] = ("clean_acc", "robust_acc")):
        """``per_defense``: (CPUs, GPUs) one trial of that defense holds, where it differs from
        ``cpus_per_trial``/``gpus_per_trial`` (``defenses.<d>.resources``, ``gpu_shares``):
        the header adds up what the running trials hold. ``objectives``: the sweep's, which
        the front is taken on (a ``cost`` objective adds its column to the front table)."""
        self.objectives = list(objectives)
        self.total_trials = total_trials
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.per_defense = dict(per_defense or {})
        self.cluster_cpus = cluster_cpus
        self.cluster_gpus = cluster_gpus
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self._clock = time.monotonic   # an attribute so tests can drive time
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.RLock()  # Tune's thread writes while Live's thread draws
        self._live: Live | None = None
        self._t0 = self._clock()
        self._defense = ""
        self._key_hparams: dict[str, list[str]] = {}
        self._rows: dict[str, _Row] = {}
        self._front_ids: list[str] = []
        self._peak_running = 0

    # Tuner pickles its RunConfig, callbacks included, into tuner.pkl; a console, a lock
    # and a Live display cannot be pickled, so only the settings travel.
    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("total_trials", "cpus_per_trial", "gpus_per_trial",
                                              "cluster_cpus", "cluster_gpus", "live", "per_defense",
                                              "objectives")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled before per_defense or objectives existed: their defaults
        self.__dict__.update({"per_defense": {}, "objectives": ["clean_acc", "robust_acc"], **state})
        self.console = Console()
        self._clock = time.monotonic
        self._init_state()

    # ---------------------------------------------------------------- display lifecycle
    def start(self) -> "Dashboard":
        if self.live and self._live is None:
            self._live = Live(get_renderable=self.render, console=self.console,
                              refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def stop(self) -> None:
        """Close the Live display, leaving its last frame on screen. Safe to call twice and
        from Ctrl-C handlers: the display is detached before it is stopped."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _refresh(self) -> None:
        live = self._live
        if live is not None:
            live.refresh()

    # ---------------------------------------------------------------- Tune-independent API
    def begin_defense(self, defense: str, key_hparams: list[str]) -> None:
        """``defense``'s rows show ``key_hparams``; a trial reported without a defense of its
        own belongs to the last one named."""
        with self._lock:
            self._defense = defense
            self._key_hparams[defense] = list(key_hparams)
        logger.debug("dashboard: defense %s", defense)
        self._refresh()

    def trial_started(self, trial_id: str, defense: str, hp: dict) -> None:
        with self._lock:
            # A restarted trial starts over: a fresh row replaces the old one.
            self._rows[trial_id] = _Row(trial_id, defense or self._defense, dict(hp),
                                        started=self._clock())
            self._peak_running = max(self._peak_running, self._count(RUNNING))
        self._refresh()

    def trial_progress(self, trial_id: str, result: dict) -> None:
        """One per-epoch report; the final one carries the trial's record."""
        with self._lock:
            row = self._row(trial_id)
            if row.ended is not None:
                return
            row.epoch = int(result.get("epoch") or row.epoch)
            row.epochs = int(result.get("epochs") or row.epochs)
            row.clean = _num(result.get("clean_acc", row.clean))
            row.robust = _num(result.get("robust_acc", row.robust))
            row.flags.update({k[len("flag."):]: bool(v) for k, v in result.items()
                              if k.startswith("flag.")})
        if result.get("record"):
            self.trial_finished(trial_id, TrialRecord.from_dict(result["record"]))
        elif result.get("status") == FAILED:
            self.trial_errored(trial_id, str(result.get("error") or "failed"))
        else:
            self._refresh()

    def trial_finished(self, trial_id: str, record: TrialRecord) -> None:
        with self._lock:
            row = self._row(trial_id, record.defense, record.hp)
            if row.ended is None:
                row.record = record
                row.clean, row.robust = _num(record.clean_acc), _num(record.robust_acc)
                row.n = record.n_eval
                row.attack, row.seconds = record.robust_attack, _num(record.train_seconds)
                row.flags.update({k: bool(v) for k, v in record.flags.items()})
                row.epochs = record.epochs or row.epochs
                if record.status != FAILED:
                    row.epoch = row.epochs   # a completed trial ran all its epochs
            status = FAILED if record.status == FAILED else COMPLETED
        self._finish(row, status, short_reason(record.error))

    def trial_errored(self, trial_id: str, reason: str) -> None:
        with self._lock:
            row = self._row(trial_id)
        self._finish(row, FAILED, reason)

    # ---------------------------------------------------------------- Ray Tune hooks
    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        config = getattr(trial, "config", None) or {}
        self.trial_started(trial.trial_id, config.get("defense") or self._defense,
                           config.get("hp") or {})

    @_guarded
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        self.trial_progress(trial.trial_id, result)

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        # Normally the final report already finished the row; this catches the report Tune
        # deduplicated, and trials a scheduler stopped before their evaluation.
        record = (getattr(trial, "last_result", None) or {}).get("record")
        if record:
            self.trial_finished(trial.trial_id, TrialRecord.from_dict(record))
        else:
            with self._lock:
                row = self._row(trial.trial_id)
            self._finish(row, STOPPED, f"stopped early after epoch {row.epoch}")

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.trial_errored(trial.trial_id, error_reason(trial))

    @_guarded
    def on_experiment_end(self, trials: list, **info) -> None:
        # Trials still running here were interrupted (Ctrl-C, a Tuner time budget).
        ids = {t.trial_id for t in trials}
        with self._lock:
            leftovers = [r for r in self._rows.values() if r.trial_id in ids and r.ended is None]
        for row in leftovers:
            self._finish(row, STOPPED, "experiment ended")
        self._refresh()

    # ---------------------------------------------------------------- state
    def _row(self, trial_id: str, defense: str = "", hp: dict | None = None) -> _Row:
        """The trial's row; one is made for a trial reported before it was seen starting
        (a restored experiment, or a trial that failed to start)."""
        row = self._rows.get(trial_id)
        if row is None:
            row = self._rows[trial_id] = _Row(trial_id, defense or self._defense,
                                              dict(hp or {}), started=self._clock())
        return row

    def _finish(self, row: _Row, status: str, reason: str) -> None:
        """Move a row to its terminal state once; later events only fill a missing reason
        (a failed record followed by Tune's own error, say)."""
        with self._lock:
            if row.ended is not None:
                row.reason = row.reason or reason
                return
            row.status, row.reason, row.ended = status, reason, self._clock()
            if status == COMPLETED:
                self._update_front()
            line = None if self.live else self._plain_line(row)
        if line is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._refresh()

    def _update_front(self) -> None:
        done = [r.record for r in self._rows.values() if r.status == COMPLETED and r.record]
        try:
            # Imported here so the rest of the view works even if the aggregator cannot load.
            from orchestrator.aggregate import pareto_front
            import pandas as pd

            front = pareto_front(pd.DataFrame([r.to_row() for r in done]), objectives=self.objectives)
            self._front_ids = list(front.sort_values("robust_acc", ascending=False)["trial_id"])
        except Exception:   # keep the last front; the trial's own line must still appear
            logger.exception("dashboard: Pareto front not updated")

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self._rows.values())

    def _eta(self) -> float | None:
        """Seconds left: the work left (mean trial duration for each trial not started,
        the rest of the mean for each running one) spread over the most trials seen running
        at once, so the ETA does not jump in the gap between two defenses' Tuners."""
        finished = [r for r in self._rows.values() if r.ended is not None]
        if not finished:
            return None
        mean = sum(r.ended - r.started for r in finished) / len(finished)
        now = self._clock()
        running = [r for r in self._rows.values() if r.ended is None]
        not_started = max(self.total_trials - len(finished) - len(running), 0)
        work = mean * not_started + sum(max(mean - (now - r.started), 0.0) for r in running)
        return work / max(self._peak_running, 1)

    # ---------------------------------------------------------------- text
    def _hp_text(self, row: _Row) -> str:
        keys = self._key_hparams.get(row.defense) or sorted(row.hp)
        return " ".join(f"{k}={_fmt(row.hp[k])}" for k in keys if k in row.hp)

    def _duration(self, row: _Row) -> float:
        if not math.isnan(row.seconds):
            return row.seconds
        return (row.ended if row.ended is not None else self._clock()) - row.started

    def _plain_line(self, row: _Row) -> str:
        n = sum(r.ended is not None for r in self._rows.values())
        head = f"[{n}/{self.total_trials}] {row.defense} {row.trial_id}"
        tail = f"{self._duration(row):.1f}s hp: {self._hp_text(row)}".rstrip()
        if row.status == FAILED:
            reason = _truncate(row.reason or "no reason reported", PLAIN_REASON_WIDTH)
            return f"{head} failed: {reason} ({tail})"
        if row.status == STOPPED:
            return f"{head} stopped ({row.reason}) {tail}"
        attack = f" ({row.attack})" if row.attack else ""
        flags = " ".join(f"flag:{k}" for k, v in sorted(row.flags.items()) if v)
        cost = f" cost={row.record.cost:.1f} {row.record.cost_unit}" \
            if "cost" in self.objectives and row.record is not None else ""
        return (f"{head} completed clean={_pct(row.clean, row.n)} robust={_pct(row.robust, row.n)}{attack}"
                f"{cost} {tail}" + (f" {flags}" if flags else ""))

    # ---------------------------------------------------------------- view
    def render(self) -> RenderableType:
        with self._lock:
            parts: list[RenderableType] = [self._header(), self._trial_table()]
            if self._front_ids:
                parts.append(self._front_table())
            failures = [r for r in self._rows.values() if r.status == FAILED]
            if failures:
                parts.append(self._failure_table(failures))
            spaced: list[RenderableType] = [parts[0]]
            for part in parts[1:]:   # a blank line between sections
                spaced += [Text(""), part]
            return Group(*spaced)

    def _header(self) -> Text:
        running = self._count(RUNNING)
        eta = self._eta()
        done = self._count(COMPLETED) + self._count(STOPPED)
        # one Tune run holds every defense's trials: name those running now
        with self._lock:
            held = [self.per_defense.get(r.defense, (self.cpus_per_trial, self.gpus_per_trial))
                    for r in self._rows.values() if r.status == RUNNING]
            now = sorted({r.defense for r in self._rows.values() if r.status == RUNNING})
        return Text.assemble(
            "running ", (", ".join(now) or "—", "bold"),
            "  elapsed ", (_clock_text(self._clock() - self._t0), "bold"),
            "  ETA ", ("—" if eta is None else _clock_text(eta), "bold"),
            "  trials ", (f"done {done}", "green"), " · ", (f"running {running}", "cyan"),
            " · ", (f"failed {self._count(FAILED)}", "red"), f" · total {self.total_trials}",
            f"  CPU {_fmt(sum(c for c, _ in held))}/{_fmt(self.cluster_cpus)}",
            f"  GPU {_fmt(sum(g for _, g in held))}/{_fmt(self.cluster_gpus)}",
        )

    def _shown_rows(self) -> tuple[list[_Row], int]:
        """Running trials first, then the most recently finished; at most MAX_ROWS."""
        rows = self._rows.values()
        running = sorted((r for r in rows if r.ended is None), key=lambda r: r.started)
        ended = sorted((r for r in rows if r.ended is not None), key=lambda r: -r.ended)
        ordered = running + ended
        return ordered[:MAX_ROWS], max(len(ordered) - MAX_ROWS, 0)

    def _trial_table(self) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False,
                      caption=self._flag_legend(), caption_justify="left", caption_style="dim")
        for name, kw in [("trial", {}), ("defense", {}), ("hyperparameters", {"max_width": 40}),
                         ("status", {}), ("epoch", {}), ("clean", {"justify": "right"}),
                         ("robust", {"justify": "right"}), ("flags", {}),
                         ("time", {"justify": "right", "min_width": 7})]:
            table.add_column(name, no_wrap=True, overflow="ellipsis", **kw)
        shown, more = self._shown_rows()
        for r in shown:
            table.add_row(r.trial_id, r.defense, self._hp_text(r),
                          Text(r.status, style=_STATUS_STYLE.get(r.status, "")),
                          self._epoch_cell(r), _pct(r.clean), _pct(r.robust),
                          _flag_markers(r.flags, r.defense), _clock_text(self._duration(r)))
        if more:
            table.add_row(Text(f"… {more} more", style="dim"))
        return table

    @staticmethod
    def _epoch_cell(row: _Row) -> RenderableType:
        if not row.epochs:
            return Text("—", style="dim")
        cell = Table.grid(padding=(0, 1))
        style = "red" if row.status == FAILED else "bar.complete"
        cell.add_row(ProgressBar(total=row.epochs, completed=row.epoch, width=10,
                                 complete_style=style, finished_style=style),
                     f"{row.epoch}/{row.epochs}")
        return cell

    def _flag_legend(self) -> str | None:
        names = sorted({k for r in self._rows.values() for k, v in r.flags.items() if v})
        if not names:
            return None
        return "flags: " + ", ".join(f"{_flag_marker(n)[0]} = {n}" for n in names)

    def _front_table(self) -> Table:
        cost = "cost" in self.objectives
        table = Table(title=f"Pareto front ({' vs '.join(self.objectives)})", title_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False)
        numbers = ("clean", "robust", "cost")
        for name in ("trial", "defense", "hyperparameters", "clean", "robust", *(("cost",) if cost else ()),
                     "flags"):
            table.add_column(name, no_wrap=True, overflow="ellipsis",
                             justify="right" if name in numbers else "left")
        for tid in self._front_ids:
            r = self._rows[tid]
            spent = (f"{r.record.cost:.0f} {r.record.cost_unit}",) if cost and r.record else ("",) * cost
            table.add_row(tid, r.defense, self._hp_text(r), _pct(r.clean, r.n),
                          _pct(r.robust, r.n) + (f" ({r.attack})" if r.attack else ""), *spent,
                          _flag_markers(r.flags, r.defense))
        return table

    @staticmethod
    def _failure_table(failures: list[_Row]) -> Table:
        table = Table(title="Failures", title_justify="left", title_style="bold red",
                      box=None, show_header=False, pad_edge=False)
        table.add_column(style="red", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(overflow="ellipsis", no_wrap=True)
        recent = sorted(failures, key=lambda r: r.ended or 0)[-MAX_FAILURES:]
        for r in recent:
            table.add_row(r.trial_id, r.defense, _truncate(r.reason, REASON_WIDTH))
        if len(failures) > len(recent):
            table.add_row(Text(f"… {len(failures) - len(recent)} more", style="dim"))
        return table


# -------------------------------------------------------------------- error reasons
def error_reason(trial) -> str:
    """A one-line reason for a failed Tune trial. Ray 2.60 appends each failure to
    ``trial.error_file`` on the driver (``"Failure # N (occurred at …)"`` then the
    traceback); ``get_error()`` reads the same text from the trial's storage."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    elif callable(getattr(trial, "get_error", None)):
        try:
            text = str(trial.get_error() or "")
        except Exception:   # storage gone or unreachable: fall back to a generic reason
            logger.debug("dashboard: no error text for %s", trial.trial_id, exc_info=True)
    return short_reason(text) or "trial errored (no error text)"


def short_reason(text: str) -> str:
    """The exception line of the latest failure in a traceback ("ValueError: …"), else its
    first line that is not a header."""
    latest = _ANSI.sub("", text).rsplit("Failure # ", 1)[-1]
    lines = [ln.strip() for ln in latest.splitlines() if ln.strip()]
    exceptions = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    if exceptions:
        return exceptions[-1]
    skip = ("occurred at", "Traceback", "ray::", "File ")
    return next((ln for ln in lines if not any(s in ln[:40] for s in skip)), "")


# -------------------------------------------------------------------- formatting
def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any) -> str:
    """Compact hyperparameter value: 0.001, 6, 3e-05, True, 'pgd'."""
    if isinstance(v, float):
        return f"{v:.3g}"
    return _truncate(str(v), 16)


def _pct(v: float, n: int = 0) -> str:
    """``49.6%``, or with ``n`` test points ``49.6±4.4%``: the larger side of its 95 % Wilson
    interval."""
    if math.isnan(v):
        return "—"
    if n <= 0:
        return f"{100 * v:.1f}%"
    low, high = accuracy_interval(v, n)
    return f"{100 * v:.1f}±{100 * max(v - low, high - v):.1f}%"


def _truncate(s: str, width: int) -> str:
    return s if len(s) <= width else s[: width - 1] + "…"


def _clock_text(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _flag_marker(name: str, defense: str = "") -> tuple[str, str]:
    """Initials, red for a flag the defense declares severe (``Defense.severe_flags``)."""
    severe = name in _severe_flags(defense)
    return "".join(w[0] for w in name.split("_") if w).upper(), "bold red" if severe else "bold yellow"


@functools.lru_cache(maxsize=None)
def _severe_flags(defense: str) -> frozenset[str]:
    try:
        return registry.get(defense).severe_flags
    except KeyError:  # a record of a defense this checkout does not have
        return frozenset()


def _flag_markers(flags: dict[str, bool], defense: str = "") -> Text:
    return Text(" ").join(Text(*_flag_marker(name, defense))
                          for name in sorted(k for k, v in flags.items() if v))
