"""Disk full for real: ``predict`` on a small tmpfs (where this process may mount one, i.e. as root).

HDF5 segfaulted (exit 139, a thousand lines of HDF5 error stack) when the disk filled while a part
was written. Parts are now built in memory and written with plain file I/O, and the merged store's
space is reserved first; this test fills a real file system to show the command ends in one line,
exit 2, keeps its complete parts, and finishes once there is space again. The injected-ENOSPC
cases in ``test_faults.py`` cover the same paths on every platform.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _mount_tmpfs(where: Path, kib: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)]).returncode == 0


@pytest.mark.slow
def test_predict_on_a_full_tmpfs_ends_in_one_line_and_resumes(pretrained_run, tmp_path):
    mount = tmp_path / "small"
    # Room for the run (model, checkpoint, ...) plus ~300 KiB: the 776 KiB store of 160 images does not fit.
    needed = sum(p.stat().st_size for p in pretrained_run.rglob("*") if p.is_file()) // 1024
    if not _mount_tmpfs(mount, needed + 300 + 64):
        pytest.skip("cannot mount a tmpfs here (needs root); test_faults.py injects ENOSPC instead")
    try:
        run = mount / "run"
        shutil.copytree(pretrained_run, run, ignore=shutil.ignore_patterns("tensorboard", "predict", "pseudolabel"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "labelpipe", "predict", "--run", str(run), "--device", "cpu"]
        full = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert full.returncode == 2, (full.returncode, full.stderr[-2000:])
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk full" in lines[0] and "it needs about" in lines[0], full.stderr[-2000:]
        parts = run / "predict" / "parts"
        assert not list(run.rglob(".*.tmp-*"))  # no half-written file
        kept = sorted(parts.glob("part-*.h5")) if parts.is_dir() else []
        subprocess.run(["mount", "-o", "remount,size=400m", str(mount)], check=True)
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        if kept:
            assert f"resuming predict: {32 * len(kept)} images" in again.stdout
        assert (run / "predict" / "predictions.h5").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
