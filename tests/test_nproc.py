"""--nproc N: a command relaunches itself in N processes under torch's elastic launcher (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from labelpipe.errors import LabelpipeError
from labelpipe.launch import resolve_nproc, strip_nproc
from tests.conftest import REPO, TINY_RECIPE, run_cli


def tiny(command: str, run, *extra: str) -> list[str]:
    return [command, "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu", *extra]


def labelpipe_nproc(args: list[str], timeout: float = 240) -> str:
    """``labelpipe ARGS`` as a user types it, in a process of its own (the launcher starts the workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "labelpipe", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"labelpipe {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["pretrain", "predict", "selftrain", "evaluate", "segment"])
def test_every_command_with_nproc_relaunches_itself_without_the_flag(command, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("labelpipe.launch.launch", lambda args, n: calls.append((list(args), n)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = [command, "--run", str(tmp_path / "never"), "--device", "cpu", "--nproc", "2"]
    if command == "segment":
        args += [str(tmp_path), "--out", str(tmp_path / "out")]
    assert run_cli(args) == 0
    assert calls == [(args, 2)]  # the whole command line; each process drops --nproc (strip_nproc)
    assert not (tmp_path / "never").exists()  # the command itself ran in the launched processes only
    assert strip_nproc(args) == [a for a in args if a not in ("--nproc", "2")]
    assert strip_nproc(["evaluate", "--nproc=3", "--run", "r"]) == ["evaluate", "--run", "r"]


def test_nproc_values():
    assert resolve_nproc("2", "cpu") == 2
    with pytest.raises(LabelpipeError, match="at least 1"):
        resolve_nproc("0", "cpu")
    with pytest.raises(LabelpipeError, match="a number of processes or 'gpus'"):
        resolve_nproc("many", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LabelpipeError, match="no CUDA device"):
            resolve_nproc("gpus", "auto")


@pytest.mark.slow
def test_evaluate_with_nproc_2_gives_the_one_process_metrics(pretrained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    metrics_path = run / "evaluate" / "pretrain" / "metrics.json"
    assert run_cli(tiny("evaluate", run)) == 0
    single = json.loads(metrics_path.read_text())
    metrics_path.unlink()
    labelpipe_nproc(tiny("evaluate", run, "--nproc", "2"))
    double = json.loads(metrics_path.read_text())
    assert double["confusion"] == single["confusion"] and double["images"] == single["images"]
    assert double["per_class_iou"] == single["per_class_iou"]
    assert double["ece"] == pytest.approx(single["ece"], abs=1e-9)


@pytest.mark.slow
def test_pretrain_with_nproc_2_trains_on_two_ranks_and_a_failure_exits_non_zero(data_cache, tmp_path):
    run = tmp_path / "run"
    labelpipe_nproc(tiny("pretrain", run, "--nproc", "2", "--steps", "4"))
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["status"] == "done"
    rngs = torch.load(run / "pretrain" / "checkpoint.pt", weights_only=False)["rng"]
    assert isinstance(rngs, list) and len(rngs) == 2  # one RNG state per rank: it ran under DDP
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    failed = subprocess.run(
        [sys.executable, "-m", "labelpipe", *tiny("evaluate", run, "--model", "round-9", "--nproc", "2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert failed.returncode == 2 and "round-9" in failed.stderr
