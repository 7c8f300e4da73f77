"""No code runs from files: every pickle labelpipe reads goes through torch's weights-only unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from labelpipe.errors import LabelpipeError
from labelpipe.store.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as fh:  # a plain pickle, the way torch.save writes a legacy file
        pickle.dump({"model": {}, "step": 3, "evil": _Payload(marker)}, fh)
    torch.save({"step": 3, "evil": _Payload(marker)}, path.with_suffix(".zip.pt"))


@pytest.mark.parametrize("fmt", ["legacy-pickle", "torch-zip"])
def test_planted_pickle_in_a_checkpoint_never_runs_and_the_error_names_the_file(tmp_path, fmt):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    _plant(ckpt, marker)
    target = ckpt if fmt == "legacy-pickle" else ckpt.with_suffix(".zip.pt")
    with pytest.raises(LabelpipeError) as err:
        load_checkpoint(target)
    assert not marker.exists()
    assert str(target) in str(err.value) and "--force" in str(err.value)
    assert "\n" not in str(err.value)


def test_planted_pickle_in_backbone_weights_never_runs(tmp_path):
    from labelpipe.models.backbones import build_backbone, load_backbone_weights

    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    with pytest.raises(LabelpipeError) as err:
        load_backbone_weights(build_backbone("resnet18", output_stride=16), weights)
    assert not marker.exists()
    assert str(weights) in str(err.value)


def test_checkpoint_with_every_rng_state_round_trips_under_weights_only(tmp_path):
    """The training state (RNG states of torch, numpy and python included) loads with ``weights_only``."""
    torch.manual_seed(1), np.random.seed(2)
    import random

    random.seed(3)
    state = {"step": 7, "model": {"w": torch.arange(4.0)}, "rng": rng_state(), "last_val": {"miou": 0.5}}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    set_rng_state(loaded["rng"])
    assert loaded["step"] == 7 and loaded["last_val"] == {"miou": 0.5}
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
