"""Where a command writes: the rules that keep earlier results from being lost.

- ``fresh_problem(out)``: a new sweep needs ``--out`` to be absent or empty; anything in it is
  named, with the two ways out (``--resume``, another ``--out``).
- ``overwrite_problem(paths, force)``: a command that writes named files (the aggregator's
  CSVs in ``--out``, the evaluate CLI's ``--json``) never replaces a file it was not asked to
  replace: existing targets are named, with ``--force`` as the way to replace them.
- ``RunLock(out)``: one sweep per folder. ``OUT/.sweep.lock`` holds the holder's pid, host and
  start time; a second sweep on the folder is refused with the holder named; a lock left by a
  dead process on this host is taken over with a warning (on another host its pid cannot be
  checked, so it is refused and named, to be removed by hand once that sweep is known dead).

- ``write_failure(folder, error)``: a write that failed (disk full, folder read-only), as one
  line naming the folder and the space left there.

Each problem is one line (the CLIs print it and exit 2 before any expensive work)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable

log = logging.getLogger("orchestrator.outdir")

LOCK_FILE = ".sweep.lock"


class LockHeld(Exception):
    """Another live sweep writes this folder: one line, exit code 2."""


def _listing(folder: Path, ignore: tuple[str, ...] = (), at_most: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ignore)
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def fresh_problem(out: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """Why ``out`` cannot take a new sweep (None: absent or an empty folder, but for the
    names in ``ignore``)."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} is a file, not a folder; choose another --out"
    if not any(p.name not in ignore for p in out.iterdir()):
        return None
    what = "an earlier run" if (out / "spec.json").is_file() else "files this sweep did not write"
    return (f"output dir {out} holds {what} ({_listing(out, ignore)}); pass --resume to continue a run "
            "there, or choose another --out (an absent or empty folder)")


def overwrite_problem(paths: Iterable[Path], force: bool) -> str | None:
    """Why writing ``paths`` would lose a file (None: none exists, or ``force``)."""
    if force:
        return None
    there = [p for p in paths if p.exists()]
    if not there:
        return None
    names = ", ".join(str(p) for p in there[:3]) + (f" and {len(there) - 3} more" if len(there) > 3 else "")
    return f"{names} already exist{'s' if len(there) == 1 else ''}; pass --force to replace " \
           f"{'it' if len(there) == 1 else 'them'}, or write elsewhere"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """``with RunLock(out):`` holds ``out/.sweep.lock`` for the sweep's lifetime."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LockHeld(f"{self.path} could not be taken; remove it if no sweep writes {self.path.parent}")

    def _take_over_if_stale(self) -> None:
        h = self.holder() or {}
        pid, host = h.get("pid"), h.get("host")
        where = f"pid {pid} on {host}, started {h.get('started')}"
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            log.warning("taking over the lock of a sweep that is gone (%s): %s", where, self.path)
            self.path.unlink(missing_ok=True)
            return
        if not h:  # unreadable: a holder that died while writing it, or a foreign file
            raise LockHeld(f"{self.path} exists but is unreadable; remove it if no sweep writes "
                           f"{self.path.parent}")
        raise LockHeld(f"another sweep writes {self.path.parent} ({where}); wait for it, or "
                       "choose another --out")

    def release(self) -> None:
        if self.held:
            h = self.holder() or {}
            if h.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def write_failure(folder: Path, error: OSError) -> str:
    """One line for an export that could not be written: what, where, and how much room is left
    (the files already there were replaced atomically or not at all, so they are intact)."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"cannot write to {folder}: {error.strerror or error} ({free}); the files already there are intact"
