"""``train.compile``: the compiled model trains, and what is saved is the plain module's state."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from labelpipe.models import build_model
from labelpipe.runtime import unwrap
from tests.conftest import TINY_RECIPE, run_cli


def test_unwrap_peels_compile_and_data_parallel():
    model = build_model(3, "resnet18", 16, (1, 2, 3), 16)
    compiled = torch.compile(torch.nn.DataParallel(model), backend="eager")
    assert unwrap(compiled) is model
    assert unwrap(model) is model
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in unwrap(compiled).state_dict())


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(data_cache, tmp_path):
    run = tmp_path / "run"
    common = ["--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]
    compiled = ["--set", "train.compile=default", "--set", "train.compile_backend=aot_eager"]
    assert run_cli(["pretrain", *common, *compiled, "--set", "train.steps=4"]) == 0
    with safe_open(run / "pretrain" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    state = torch.load(run / "pretrain" / "checkpoint.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    # compile settings are not part of what the weights are: without them the run is up to date
    saved = (run / "pretrain" / "model.safetensors").stat().st_mtime_ns
    assert run_cli(["pretrain", *common, "--set", "train.steps=4"]) == 0
    assert (run / "pretrain" / "model.safetensors").stat().st_mtime_ns == saved
    # self-training: the EMA teacher follows the compiled student
    assert run_cli(["selftrain", *common, *compiled, "--rounds", "1", "--contrastive"]) == 0
    with safe_open(run / "selftrain" / "round-1" / "train" / "model.safetensors", "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())
    assert run_cli(["evaluate", *common]) == 0
    assert (run / "evaluate" / "round-1" / "metrics.json").is_file()
