"""`labelpipe run RECIPE`: the stages in order, a before/after table, and nothing redone on a second run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_RECIPE, run_cli


@pytest.mark.slow
def test_run_recipe_prints_before_and_after(data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "run",
        str(TINY_RECIPE),
        "--run",
        str(run),
        "--device",
        "cpu",
        "--set",
        "pipeline=[pretrain, evaluate, selftrain, evaluate]",
        "--set",
        "selftrain.rounds=1",
    ]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "pretrain -> round-1 on target_test" in out
    assert json.loads((run / "evaluate/round-1/metrics.json").read_text())["model"] == "round-1"
    mtime = (run / "selftrain/round-1/train/model.safetensors").stat().st_mtime_ns
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "up to date" in out
    assert (run / "selftrain/round-1/train/model.safetensors").stat().st_mtime_ns == mtime
    assert "pretrain -> round-1 on target_test" in out  # the baseline is still pretrain's, not the newest model
    # Other round settings: the round is retrained, and the first evaluate still reads pretrain, not the round-1 on
    # disk from the earlier settings (which would be compared with itself, and no before/after table printed).
    assert run_cli([*args, "--set", "selftrain.steps=5"]) == 0
    out = capsys.readouterr().out
    assert (run / "selftrain/round-1/train/model.safetensors").stat().st_mtime_ns != mtime
    assert "pretrain -> round-1 on target_test" in out
    assert out.index(" pretrain on target_test") < out.index(" round-1 on target_test")
