"""One process per stage of a run: ``RUN/.locks/<stage>.lock``, held with ``fcntl.flock`` while it works.

The lock file holds the holder's pid and host. A second process asking for the same stage of the
same run gets a one-line "run R is in use by PID N on HOST" error (exit 2). ``flock`` locks die
with their process, so the lock of a killed process is simply taken over (its file is rewritten);
nothing has to be cleaned by hand. The file is removed when its holder finishes. Locks are per
stage (``pretrain``, ``predict``, ``selftrain``, ...), so ``evaluate`` may look at a run while
``selftrain`` trains in it.

A run directory that cannot be written (read-only) yields no lock: the stage may still find
itself up to date and report so; if it has to write, the first write fails with a one-line
"read-only" error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from labelpipe.errors import READ_ONLY, LabelpipeError
from labelpipe.store.atomic import sweep_stale_temporaries

LOCK_DIR = ".locks"


def lock_path(run_dir: Path, stage: str) -> Path:
    """``selftrain/round-1/predict`` -> ``RUN/.locks/selftrain__round-1__predict.lock``."""
    return Path(run_dir) / LOCK_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "__", stage) + ".lock")


def holder(path: Path) -> dict:
    """What a lock file says about its holder (empty when unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_run_dir(run_dir: Path) -> None:
    """A ``--run`` that names a file (or lies under one) is refused with one line, before anything else."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise LabelpipeError(f"--run {run_dir}: {path} is a file, not a directory; pass a run directory")
            return


def _acquire(path: Path, run_dir: Path, stage: str) -> int:
    """An open descriptor of ``path`` holding its flock (the file on disk is still the one locked)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = holder(path)
            who = f"PID {info.get('pid', '?')} on {info.get('host', '?')}"
            raise LabelpipeError(
                f"run {run_dir} is in use by {who} ({stage}); wait for it to finish or stop it, then run the "
                "command again"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed it between our open and flock: try again


@contextlib.contextmanager
def run_lock(run_dir: Path, stage: str, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the lock of ``stage`` in ``run_dir`` for the ``with`` block (yields the lock file; None when the
    run directory is read-only or ``enabled`` is False, e.g. on DDP ranks other than 0).

    Taking the lock also sweeps the half-written temporaries that killed processes left in the run's root.
    On release the lock file is removed, and so are the directories taking it created if they are still
    empty: a command that was rejected leaves the run as it was.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if not enabled:
        yield None
        return
    path = lock_path(run_dir, stage)
    created = [d for d in (path.parent, run_dir, *run_dir.parents) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, run_dir, stage)
    except OSError as exc:
        if exc.errno in READ_ONLY:
            yield None  # read-only: an up-to-date stage still reports; a write fails with one line
            return
        raise
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        sweep_stale_temporaries(run_dir, recursive=False)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it; a waiting process re-checks the inode (see _acquire)
        os.close(fd)  # closing the descriptor releases the flock
        for directory in created:  # innermost first
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty


def stage_name(run_dir: Path, stage_dir: Path) -> str:
    """The lock name of a stage directory: its path inside the run (``selftrain/round-1/predict``)."""
    try:
        return Path(stage_dir).relative_to(run_dir).as_posix()
    except ValueError:
        return Path(stage_dir).name
