"""A run with every stage (pretrain, evaluate, one self-training round, evaluate), shared by the curves,
report and compare tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_RECIPE, run_cli


@pytest.fixture(scope="session")
def full_run(data_cache, tmp_path_factory) -> Path:
    """``labelpipe run tiny.yaml`` with ``[pretrain, evaluate, selftrain, evaluate]`` and one round (~30 s)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    args = ["run", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]
    args += ["--set", "pipeline=[pretrain, evaluate, selftrain, evaluate]", "--set", "selftrain.rounds=1"]
    assert run_cli(args) == 0
    return run
