"""Temperature scaling recovers the temperature that over-confident logits were sharpened by."""

from __future__ import annotations

import pytest
import torch

from labelpipe.calibration import fit_temperature, nll


def calibrated(n: int = 20_000, classes: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets drawn from softmax(logits): calibrated by construction (T = 1 is optimal)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen) * 2
    target = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen)[:, 0]
    return logits, target


def test_over_confident_logits_get_t_above_one_and_a_lower_nll():
    logits, target = calibrated()
    fit = fit_temperature(logits * 3, target)
    assert fit["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fit["nll_after"] < fit["nll_before"] - 0.1
    assert fit["ece_after"] < fit["ece_before"]
    assert fit["nll_after"] == pytest.approx(nll(logits * 3, target, fit["temperature"]))
    assert fit["pixels"] == target.numel()


def test_under_confident_logits_get_t_below_one():
    logits, target = calibrated(seed=1)
    assert fit_temperature(logits / 2, target)["temperature"] == pytest.approx(0.5, rel=0.1)


def test_calibrated_logits_keep_t_near_one():
    logits, target = calibrated(seed=2)
    fit = fit_temperature(logits, target)
    assert fit["temperature"] == pytest.approx(1.0, abs=0.05)
    assert fit["nll_after"] <= fit["nll_before"] + 1e-6
    assert fit["nll_before"] - fit["nll_after"] < 1e-3
