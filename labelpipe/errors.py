"""The one exception type users see: a one-line message that names the file and the fix.

Also the translation of operating-system faults (disk full, read-only file system, a file where a
directory is expected) into such one-line errors, so that the CLI never shows a traceback for them.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LabelpipeError(Exception):
    """Bad input, usage or a fault the user can fix. The CLI prints ``str(error)`` on one line and exits
    with ``exit_code`` (2; 130 for :class:`Interrupted`)."""

    exit_code = 2


class Interrupted(LabelpipeError):
    """Ctrl-C: the message says what was saved and how to resume; exit status 130."""

    exit_code = 130


# errno values of "the disk is full" and "this place cannot be written".
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# What libraries that do their own I/O (HDF5, torch's zip writer, safetensors) put in their messages.
_DISK_FULL_TEXT = ("no space left on device", "errno = 28", "disk quota exceeded", "file write failed")


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                if hasattr(os, "statvfs"):  # what shutil.disk_usage does, without importing shutil
                    stat = os.statvfs(candidate)
                    return stat.f_bavail * stat.f_frsize
                import shutil

                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a library's RuntimeError wrapping one) means the disk is full."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _DISK_FULL_TEXT)


def disk_full_error(path: Path, needed: int | None = None) -> LabelpipeError:
    """The one-line error for a write to ``path`` that ran out of space (``needed``: bytes it takes)."""
    free = free_bytes(Path(path).parent)
    need = f"it needs about {human_bytes(needed)}" if needed else "it needs more space"
    have = f", {human_bytes(free)} free" if free is not None else ""
    return LabelpipeError(
        f"{path}: disk full (no space left on device); {need}{have}; free some space and run the same "
        "command again (completed work is kept)"
    )


def os_error_message(exc: OSError) -> str | None:
    """A one-line message for an OSError a user can fix (disk full, read-only, wrong kind of path), else None."""
    where = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or str(exc)
    if is_disk_full(exc):
        if exc.filename is None:
            return "disk full (no space left on device); free some space and run the same command again"
        return str(disk_full_error(Path(str(where))))
    if exc.errno in READ_ONLY:
        return (
            f"{where}: cannot write here ({reason}); the run directory is read-only: make it writable or pass "
            "another --run"
        )
    if exc.errno == errno.ENOTDIR:
        return f"{where}: a path component is a file, not a directory ({reason}); pass a directory"
    if exc.errno in (errno.EEXIST, errno.EISDIR):
        return f"{where}: {reason}; pass a directory for --run and files where files are expected"
    return None


@contextmanager
def exit_on_error(debug: bool = False) -> Iterator[None]:
    """The CLI's error policy around a command: a :class:`LabelpipeError`, an operating-system fault the
    user can fix (:func:`os_error_message`) and Ctrl-C become one line on stderr and a non-zero exit
    status (``debug``: the traceback too); anything else propagates."""
    try:
        yield
    except LabelpipeError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # disk full, read-only, a file where a directory belongs: one line, exit 2
        message = os_error_message(exc)
        if message is None:
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
