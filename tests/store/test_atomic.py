"""Atomic writes and the sweep of what killed writers leave behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from labelpipe.store.atomic import atomic_write_text, sweep_stale_temporaries, temp_sibling


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_failed_write_keeps_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    from labelpipe.store.atomic import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_sweep_removes_only_files_of_dead_writers_on_this_host(tmp_path):
    live = temp_sibling(tmp_path / "live.h5")
    live.write_text("x")
    name = temp_sibling(tmp_path / "sub" / "checkpoint.pt").name
    dead = tmp_path / "sub" / name.rsplit("-", 1)[0].__add__(f"-{dead_pid()}")
    dead.parent.mkdir()
    dead.write_text("x")
    other_host = tmp_path / ".model.safetensors.tmp-someotherhost-1"
    other_host.write_text("x")
    unrelated = tmp_path / "notes.tmp-12"
    unrelated.write_text("x")

    assert sweep_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and other_host.exists() and unrelated.exists() and not dead.exists()
    assert sweep_stale_temporaries(tmp_path / "missing") == []
