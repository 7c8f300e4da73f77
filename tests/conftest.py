"""Shared fixtures: a tiny DigitScapes built once per session, one torch thread (2-core machine)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "stages" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """TMPDIR of every subprocess the tests start: torchrun leaves a ``torchelastic_*`` log folder per launch in
    the temporary directory, which goes under the session's base temp (pruned by pytest) instead of /tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """LABELPIPE_DATA for the whole session, with the tiny DigitScapes built in it."""
    from labelpipe.config import DataConfig
    from labelpipe.data.digitscapes import build_digitscapes

    cache = tmp_path_factory.mktemp("labelpipe-data")
    os.environ["LABELPIPE_DATA"] = str(cache)
    build_digitscapes(DataConfig(digitscapes={"size": "tiny"}).resolved_root(), seed=0, size="tiny")
    return cache


@pytest.fixture()
def tiny_root(data_cache) -> Path:
    from labelpipe.config import DataConfig

    return DataConfig(digitscapes={"size": "tiny"}).resolved_root()


@pytest.fixture()
def tiny_copy(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny data set that a test may break."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_root, dst)
    return dst


@pytest.fixture(scope="session")
def pretrained_run(data_cache, tmp_path_factory) -> Path:
    """A run directory with a (6-step) pretrained model on the tiny data set."""
    from labelpipe.cli import main

    run = tmp_path_factory.mktemp("runs") / "pretrained"
    try:
        main(["pretrain", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"])
    except SystemExit as exc:  # pragma: no cover - typer exits 0 on success
        assert exc.code in (0, None)
    return run


def load_benchmark(name: str):
    """The script ``benchmarks/NAME.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(args: list[str]) -> int:
    """Run ``labelpipe ARGS`` in-process; returns the exit status (0 when the command returns)."""
    from labelpipe.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    return info.value.code
