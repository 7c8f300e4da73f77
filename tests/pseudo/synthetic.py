"""Random predictions for the property tests: float16 confidences skewed towards 1.0 with many ties."""

from __future__ import annotations

import numpy as np


def random_predictions(seed: int, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(label uint8 (n,), conf float16 (n,)): skewed classes, conf in [1/C, 1], coarse values => ties."""
    rng = np.random.default_rng(seed)
    class_weights = rng.dirichlet(np.full(num_classes, 0.7))
    label = rng.choice(num_classes, size=n, p=class_weights).astype(np.uint8)
    conf = 1.0 - rng.exponential(rng.choice([0.01, 0.1, 0.3]), size=n)
    if rng.random() < 0.5:
        conf = np.round(conf * 16) / 16  # few distinct values: heavy ties
    conf = np.clip(conf, 1.0 / num_classes, 1.0).astype(np.float16)
    return label, conf


def random_prior(seed: int, num_classes: int) -> np.ndarray:
    prior = np.random.default_rng(seed + 1).dirichlet(np.ones(num_classes))
    return prior / prior.sum()


def random_nonnegative_float16(seed: int, n: int) -> np.ndarray:
    """Entropy-like values >= 0 with ties (some exact zeros)."""
    rng = np.random.default_rng(seed)
    values = rng.gamma(0.5, 0.8, size=n)
    values[rng.random(n) < 0.1] = 0.0
    if rng.random() < 0.5:
        values = np.round(values * 8) / 8
    return values.astype(np.float16)
