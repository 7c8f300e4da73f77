"""The learning-rate schedule: linear warm-up, then poly decay over a horizon that may outlast training."""

from __future__ import annotations

import pytest
import torch

from labelpipe.config import TrainConfig
from labelpipe.training.loop import lr_factor, poly_schedule


def test_poly_without_warmup_matches_the_formula():
    for it in (0, 1, 50, 99, 100):
        assert lr_factor(it, 100, 0.9) == pytest.approx(max(0.0, 1 - it / 100) ** 0.9)


def test_warmup_rises_linearly_from_a_tenth_then_joins_poly():
    assert lr_factor(0, 1000, 0.9, warmup=100) == pytest.approx(0.1)
    assert lr_factor(50, 1000, 0.9, warmup=100) == pytest.approx(0.55)
    assert lr_factor(100, 1000, 0.9, warmup=100) == pytest.approx((1 - 100 / 1000) ** 0.9)


def test_scheduler_follows_the_factor_with_a_longer_horizon():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-4)
    sched = poly_schedule(opt, total=100_000, power=0.9, warmup=5000)
    lrs = []
    for _ in range(25_000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-5)
    assert lrs[5000] == pytest.approx(2e-4 * (1 - 0.05) ** 0.9)
    assert lrs[-1] == pytest.approx(2e-4 * (1 - 24_999 / 100_000) ** 0.9)  # stops well above zero


def test_new_schedule_settings_enter_the_fingerprint_only_when_set():
    plain = TrainConfig().fingerprint_fields()
    assert "schedule_steps" not in plain and "warmup_steps" not in plain
    assert "compile" not in plain and "num_workers" not in plain
    assert TrainConfig(warmup_steps=10).fingerprint_fields()["warmup_steps"] == 10
    assert TrainConfig(schedule_steps=5000).fingerprint_fields() != plain


def test_a_horizon_shorter_than_training_is_refused(data_cache, tmp_path, capsys):
    from tests.conftest import TINY_RECIPE, run_cli

    tiny = ["--config", str(TINY_RECIPE), "--run", str(tmp_path / "run"), "--device", "cpu"]
    assert run_cli(["pretrain", *tiny, "--set", "train.schedule_steps=3"]) == 2
    assert "train.schedule_steps=3" in capsys.readouterr().err
