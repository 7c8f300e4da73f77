"""Pseudo-label generators (ALGORITHMS.md section 2), their quality metrics (section 5), and the labelling
of a prediction store.

The generators are pure numpy: arrays in, arrays out. One module per method: ``threshold``, ``cbst``,
``dars`` (seed 002), ``entropy`` (U2PL, seed 003; torch online split in ``entropy_online``), ``variance``
(seed 000), each registering its generator in ``registry`` (which every other layer derives its list of
methods from); ``histogram`` gives exact float16 order statistics in one streaming pass and ``streaming``
drives the two passes over a prediction store for any registered generator. Around them, with I/O and no
torch: ``labelling`` (``label_store``: labels.h5 and the report of a store; the stage directory),
``run_store`` (a run's store), ``report``, ``prior`` (a prior from a file or masks) and ``ranks`` (many
processes). ``entropy_split_torch`` / ``entropy_threshold_torch`` are imported lazily so that importing
this package does not import torch.
"""

from __future__ import annotations

from typing import Any

from labelpipe.pseudo.cbst import cbst_pseudo_labels, cbst_thresholds, cbst_thresholds_from_histogram
from labelpipe.pseudo.dars import (
    dars_pseudo_labels,
    dars_target_counts,
    dars_thresholds,
    dars_thresholds_from_histogram,
)
from labelpipe.pseudo.entropy import (
    alpha_schedule,
    entropy_pseudo_labels,
    entropy_threshold,
    entropy_threshold_from_histogram,
)
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.quality import PseudoQualityAccumulator, pseudo_label_quality, uncertainty_gap
from labelpipe.pseudo.registry import (
    Histogram,
    PseudoLabelGenerator,
    generator_names,
    get_generator,
    register_generator,
)
from labelpipe.pseudo.streaming import apply, fit_thresholds
from labelpipe.pseudo.threshold import threshold_pseudo_labels
from labelpipe.pseudo.validation import IGNORE_LABEL
from labelpipe.pseudo.variance import (
    variance_cutoff,
    variance_cutoff_from_histogram,
    variance_pseudo_labels,
    variance_pseudo_labels_at_cutoff,
)

_TORCH_NAMES = ("entropy_split_torch", "entropy_threshold_torch")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from labelpipe.pseudo import entropy_online

        return getattr(entropy_online, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_LABEL",
    "Float16Histogram",
    "Histogram",
    "PseudoLabelGenerator",
    "PseudoQualityAccumulator",
    "alpha_schedule",
    "apply",
    "cbst_pseudo_labels",
    "cbst_thresholds",
    "cbst_thresholds_from_histogram",
    "dars_pseudo_labels",
    "dars_target_counts",
    "dars_thresholds",
    "dars_thresholds_from_histogram",
    "entropy_pseudo_labels",
    "entropy_split_torch",
    "entropy_threshold",
    "entropy_threshold_from_histogram",
    "entropy_threshold_torch",
    "fit_thresholds",
    "generator_names",
    "get_generator",
    "pseudo_label_quality",
    "register_generator",
    "threshold_pseudo_labels",
    "uncertainty_gap",
    "variance_cutoff",
    "variance_cutoff_from_histogram",
    "variance_pseudo_labels",
    "variance_pseudo_labels_at_cutoff",
]
