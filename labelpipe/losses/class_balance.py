"""Class-balanced cross-entropy weights from a class prior (long-tailed labeled sets).

``w_c = p_c^-power / sum_k p_k^(1 - power)``: inverse-frequency weights softened by ``power`` (0: plain CE,
0.5: inverse square root, 1: inverse frequency), scaled so that the prior-weighted mean weight
``sum_c p_c w_c`` is 1, i.e. a pixel weighs 1 on average and the loss keeps its scale and learning rate.
On DigitScapes' seed-0 source (background 93 % of the pixels, the rarest digit 0.06 %) power 0.5 gives the
background 0.61 and the rarest digit ~24: a class the unweighted loss never learns in a short schedule
gets a gradient. Classes absent from the prior (p_c = 0) never occur as targets; they get the largest
weight of the present classes so that the vector stays finite.
"""

from __future__ import annotations

import numpy as np


def class_balance_weights(prior: np.ndarray, power: float) -> np.ndarray:
    """(C,) float32 CE class weights for ``prior`` (C,) (non-negative, any scale) at ``power`` in [0, 1]."""
    prior = np.asarray(prior, dtype=np.float64).reshape(-1)
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must lie in [0, 1], got {power}")
    if prior.size == 0 or np.any(prior < 0) or not np.all(np.isfinite(prior)) or prior.sum() <= 0:
        raise ValueError("prior must be finite, non-negative and not all zero")
    prior = prior / prior.sum()
    present = prior > 0
    weights = np.empty_like(prior)
    weights[present] = prior[present] ** -power
    weights /= float(np.sum(prior[present] * weights[present]))
    weights[~present] = weights[present].max()
    return weights.astype(np.float32)
