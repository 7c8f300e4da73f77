"""Plain self-training ("ST", seed 000's baseline table): one confidence threshold for every class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from labelpipe.pseudo.registry import PseudoLabelGenerator, register_generator
from labelpipe.pseudo.validation import IGNORE_LABEL, finite_number, flat_float16, flat_labels, same_length


def threshold_pseudo_labels(label: np.ndarray, conf: np.ndarray, tau: float) -> np.ndarray:
    """Keep the predicted class where ``conf > tau`` (strictly), else 255.

    label: (N,) or any shape, uint8 predicted classes ``argmax p``; conf: same size, float16 ``max p``;
    tau: the threshold (ALGORITHMS.md default 0.9, a config value). Returns labels in ``label``'s shape
    and dtype.
    """
    shape = np.shape(label)
    label = flat_labels(label)
    conf = flat_float16(conf, "conf")
    same_length(label, conf, "label", "conf")
    tau = finite_number(tau, "tau")
    return np.where(conf > np.float64(tau), label, np.asarray(IGNORE_LABEL, dtype=label.dtype)).reshape(shape)


def _fit(hist: None, settings: Mapping[str, Any], prior: None) -> dict[str, Any]:
    return {"tau": float(settings["tau"])}


def _label(params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: Any) -> tuple[np.ndarray, None]:
    return threshold_pseudo_labels(piece["label"], piece["conf"], params["tau"]), None


# No pass 1: tau is given.
register_generator(
    PseudoLabelGenerator(name="threshold", settings=("tau",), pass2_columns=("label", "conf"), fit=_fit, label=_label)
)
