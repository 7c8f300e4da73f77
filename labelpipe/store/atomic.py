"""Write files so that a killed process never leaves one that looks complete."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labelpipe.errors import LabelpipeError, disk_full_error, is_disk_full

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", platform.node()) or "host"  # the host name (socket.gethostname)
_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


def temp_sibling(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed onto ``path``.

    It carries the writer's host and pid, so that ``sweep_stale_temporaries`` can tell a file that a
    killed process left behind from one that a live process (another DDP rank) is still writing.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temporaries(directory: Path, recursive: bool = True) -> list[Path]:
    """Delete the half-written files that killed writers on this host left under ``directory``.

    Files of live processes and of other hosts (a shared file system) are left alone. Returns what was
    removed. ``recursive=False``: only ``directory`` itself (a run's root: ``.config.yaml.tmp-*``).
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in (directory.rglob if recursive else directory.glob)(".*.tmp-*"):
        match = _TEMP.match(path.name)
        if not match or match["host"] != _HOST or pid_alive(int(match["pid"])) or not path.is_file():
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# Fault injection for the test suite: a file-name pattern (fnmatch) whose writes fail with ENOSPC, as on a
# full disk. Read at every write, so a test sets it with monkeypatch.setenv.
INJECT_ENOSPC = "LABELPIPE_INJECT_ENOSPC"


def injected_fault(path: Path) -> None:
    """Raise ENOSPC when ``path``'s name matches ``$LABELPIPE_INJECT_ENOSPC`` (tests only; unset in use)."""
    pattern = os.environ.get(INJECT_ENOSPC)
    name = Path(path).name
    if pattern and _TEMP.match(name):
        name = name[1 : name.rindex(".tmp-")]  # a temporary is written for its final name
    if pattern and fnmatch.fnmatch(name, pattern):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def atomic_path(path: Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is fsynced and renamed onto ``path``.

    A write that runs out of space (an OSError, or a library's error that says so) becomes one
    :class:`LabelpipeError` naming ``path`` and, given ``size_hint`` (bytes), how much space it takes;
    the temporary is removed and a previous ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        injected_fault(path)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if not isinstance(exc, LabelpipeError) and is_disk_full(exc):
            raise disk_full_error(path, size_hint) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (no rename: the caller writes a temporary name); ENOSPC as an OSError."""
    injected_fault(path)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def reserve_space(directory: Path, nbytes: int, what: Path) -> None:
    """Fail early, with a one-line error, when ``directory`` cannot take ``nbytes`` more.

    HDF5 cannot fail cleanly on a full disk (h5py segfaults in its clean-up), so the stages reserve
    the space of a store before HDF5 writes it: the bytes are allocated (``posix_fallocate``, which
    sees quotas too) in a temporary file that is removed again. ``what`` is the file to be written.
    """
    if nbytes <= 0:
        return
    directory = Path(directory)
    probe = temp_sibling(directory / f"reserve-{Path(what).name}")
    try:
        injected_fault(Path(what))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, int(nbytes))
        finally:
            os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(Path(what), int(nbytes)) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
