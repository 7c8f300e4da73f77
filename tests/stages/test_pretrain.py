"""pretrain: trains, writes its artifacts, skips when up to date, and resumes after SIGKILL bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_RECIPE

LONG = ["--set", "train.steps=12", "--set", "train.checkpoint_every=2", "--set", "train.val_every=100"]


def cli(run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "labelpipe",
        "pretrain",
        "--config",
        str(TINY_RECIPE),
        "--run",
        str(run),
        "--device",
        "cpu",
        *extra,
    ]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABELPIPE_TEST_KILL")}
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_pretrain_writes_artifacts(pretrained_run):
    stage = pretrained_run / "pretrain"
    for name in ("model.safetensors", "checkpoint.pt", "log.jsonl", "metrics.json", "manifest.json"):
        assert (stage / name).is_file(), name
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert set(manifest["outputs"]) >= {"model.safetensors", "checkpoint.pt"}
    steps = [json.loads(line)["step"] for line in (stage / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps == sorted(steps)
    assert "miou" in json.loads((stage / "metrics.json").read_text())
    assert (pretrained_run / "config.yaml").is_file()
    # A setting added after runs existed is hashed only away from its default: earlier runs stay up to date.
    assert "aux_level" not in manifest["inputs"]["model"]


def test_pretrain_skips_when_up_to_date(pretrained_run, capsys):
    from labelpipe.cli import main

    before = (pretrained_run / "pretrain" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--config", str(TINY_RECIPE), "--run", str(pretrained_run), "--device", "cpu"])
        raise SystemExit(0)
    assert info.value.code == 0
    assert "up to date" in capsys.readouterr().out
    assert (pretrained_run / "pretrain" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_killed_pretrain_resumes_to_the_same_weights(data_cache, tmp_path):
    """SIGKILL right after step 7 (the test hook LABELPIPE_TEST_KILL_AFTER_STEP; checkpoints every 2 steps):
    the rerun says it resumes from step 6, the last checkpoint (not 0), and ends bit-identical."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cli(reference, *LONG), check=True, env=env(), capture_output=True)

    proc = subprocess.run(
        cli(killed, *LONG), env={**env(), "LABELPIPE_TEST_KILL_AFTER_STEP": "7"}, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    manifest = json.loads((killed / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert not (killed / "pretrain" / "model.safetensors").exists()
    assert torch.load(killed / "pretrain" / "checkpoint.pt", weights_only=True)["step"] == 6
    log = killed / "pretrain" / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line][-1] == 7

    resumed = subprocess.run(cli(killed, *LONG), check=True, env=env(), capture_output=True, text=True)
    assert "resuming pretrain from step 6 " in resumed.stdout

    a = load_file(str(reference / "pretrain" / "model.safetensors"))
    b = load_file(str(killed / "pretrain" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 13)), "log.jsonl must hold each step once after a resume"
    assert not list(killed.rglob(".*.tmp-*")), "what the killed run was writing must be swept on resume"
