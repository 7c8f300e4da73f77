"""Temperature scaling (DARS "TS"): one scalar T > 0 minimising the NLL of softmax(z / T).

A 1-D convex problem in log T, solved with ``scipy.optimize.minimize_scalar``. Arrays in, numbers out.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from labelpipe.metrics import CalibrationAccumulator


def nll(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> float:
    """Mean NLL of (N, C) logits at ``temperature`` for (N,) targets."""
    return float(torch.nn.functional.cross_entropy(logits / temperature, target))


def ece(logits: torch.Tensor, target: torch.Tensor, temperature: float, bins: int = 15) -> float:
    prob = torch.softmax(logits / temperature, 1)
    conf, pred = prob.max(1)
    acc = CalibrationAccumulator(bins)
    acc.update(conf, pred == target)
    return acc.ece()


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> dict:
    """Fit T on (N, C) float logits and (N,) int targets; returns T and NLL / ECE before and after."""
    logits, target = logits.float(), target.long()
    if target.numel() == 0:
        raise ValueError("fit_temperature needs at least one labeled pixel")
    result = minimize_scalar(
        lambda log_t: nll(logits, target, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(np.exp(result.x))
    return {
        "temperature": t,
        "nll_before": nll(logits, target, 1.0),
        "nll_after": nll(logits, target, t),
        "ece_before": ece(logits, target, 1.0),
        "ece_after": ece(logits, target, t),
        "pixels": int(target.numel()),
    }
