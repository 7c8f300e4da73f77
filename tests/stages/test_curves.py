"""curves.png: every training stage draws it from log.jsonl, redraws it at each validation and at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from labelpipe.config import TrainConfig
from labelpipe.runtime import Runtime
from labelpipe.training.curves import round_history
from labelpipe.training.loop import TrainJob, train


class Quadratic(torch.nn.Module):
    """Two scalars as 'backbone' and 'head': enough for the training loop, trains in microseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(1))
        self.b = torch.nn.Parameter(torch.ones(1))

    def parameter_groups(self):
        return [self.a], [self.b]


def content(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32)


@pytest.mark.slow
def test_curves_are_redrawn_at_each_validation_and_at_the_end(tmp_path):
    model = Quadratic()
    curves = tmp_path / "curves.png"
    seen_at_validation: list[bytes | None] = []

    def objective(batch, step):
        loss = ((model.a * model.b - 3) ** 2).sum()
        return loss, {"loss_term": float(loss.detach()), "images": 2}

    def validate(net):
        seen_at_validation.append(curves.read_bytes() if curves.is_file() else None)
        return {"miou": 0.1 * len(seen_at_validation)}

    cfg = TrainConfig(steps=8, val_every=4, log_every=1, checkpoint_every=100, amp=False, lr=0.01)
    job = TrainJob(
        tmp_path,
        model,
        8,
        lambda start: iter(range(start, 8)),
        objective,
        cfg,
        Runtime(torch.device("cpu")),
        "f",
        validate,
    )
    train(job)
    assert seen_at_validation[0] is None  # nothing before the first validation...
    assert seen_at_validation[1] is not None  # ...drawn after it, and redrawn after the last one:
    assert curves.read_bytes() != seen_at_validation[1]
    image = content(curves)
    assert image.shape[1] > 4 * image.shape[0] / 2 and image.std() > 10  # four panels, not a blank canvas


@pytest.mark.slow  # the shared full_run: ~30 s
def test_every_training_stage_leaves_curves_the_rounds_with_pseudo_label_numbers(full_run):
    pretrain = full_run / "pretrain" / "curves.png"
    round_1 = full_run / "selftrain" / "round-1" / "train" / "curves.png"
    assert pretrain.stat().st_size > 10_000 and round_1.stat().st_size > 10_000
    # The round adds a fifth panel: kept fraction and pseudo-label precision per round.
    assert content(round_1).shape[1] > 1.15 * content(pretrain).shape[1]
    (entry,) = round_history(full_run / "selftrain")
    report = json.loads((full_run / "selftrain/round-1/pseudolabel/report.json").read_text())
    assert entry["round"] == 1 and entry["kept_fraction"] == report["kept_fraction"]
    assert 0 <= entry["precision"] <= 1 and entry["pseudo_miou"] == report["pseudo_miou"]
