"""benchmarks/gpu_check.py on a machine without CUDA: the clean exit, its helpers, and a dry run of the
cheap sections at tiny size on the CPU (what runs on the GPU machine is the same code)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def no_cuda_env(**extra: str) -> dict[str, str]:
    """The environment of a machine without a visible GPU (also on a GPU machine)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=no_cuda_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "no CUDA device: nothing to check"
    assert not out.exists()  # nothing measured, nothing written


def test_read_log_keeps_training_records_and_skips_a_torn_line(gc, tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "val_miou": 0.1}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    assert [r["step"] for r in gc.read_log(log)] == [1, 2]
    assert gc.window_mean(gc.read_log(log), 1, 2) == pytest.approx(1.5)
    assert gc.read_log(tmp_path / "missing.jsonl") == []


def test_kill_after_step_kills_once_the_log_shows_the_step(gc, tmp_path):
    """A child that logs one step every 50 ms and would run for 100 s: killed right after step 3."""
    log = tmp_path / "log.jsonl"
    child = textwrap.dedent(
        f"""
        import json, time
        with open({str(log)!r}, "a", buffering=1) as f:
            for step in range(1, 2001):
                f.write(json.dumps({{"step": step, "loss": 1.0 / step}}) + "\\n")
                time.sleep(0.05)
        """
    )
    seen, status = gc.kill_after_step([sys.executable, "-c", child], log, 3, dict(os.environ), tmp_path / "o", 60)
    assert status == -9  # SIGKILL, not a clean end
    assert seen is not None and 3 <= seen < 10
    assert gc.read_log(log)[-1]["step"] < 20


@pytest.mark.slow
def test_cpu_dry_run_of_memory_and_pseudolabel_writes_the_report(data_cache, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--sections", "memory", "pseudolabel"]
    cmd += ["--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=no_cuda_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    report = (out / "gpu_check.md").read_text()
    assert "CPU dry run" in report and "## memory" in report and "## pseudolabel" in report
    raw = json.loads((out / "gpu_check.json").read_text())
    assert {c["section"] for c in raw["checks"]} == {"memory", "pseudolabel"}
    assert all(c["ok"] for c in raw["checks"])
    for row in raw["memory"]:  # the estimate beside a real measurement of the same step
        assert row["allocated"] > 0 and row["estimate_one_gpu"] > 0
        assert abs(row["estimate_one_gpu"] / row["allocated"] - 1) < 0.15
    pl = raw["pseudolabel"]
    assert pl["exit"] == 0 and pl["peak_rss_mb"] > 0 and pl["maps"] == 3
    assert (work / "pseudolabel" / "labels" / "labels.h5").is_file()
