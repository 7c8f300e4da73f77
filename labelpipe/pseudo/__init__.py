"""Pseudo-label generators (ALGORITHMS.md section 2), their quality metrics (section 5), and the labelling
of a prediction store.

The generators are pure numpy: arrays in, arrays out. One module per method: ``threshold``, ``cbst``,
``dars`` (seed 002), ``entropy`` (U2PL, seed 003; torch online split in ``entropy_online``), ``variance``
(seed 000), each registering its generator in ``registry`` (which every other layer derives its list of
methods from); ``histogram`` gives exact float16 order statistics in one streaming pass and ``streaming``
drives the two passes over a prediction store for any registered generator. Around them, with I/O and no
torch: ``labelling`` (``label_store``: labels.h5 and the report of a store; the stage directory),
``run_store`` (a run's store), ``report``, ``prior`` (a prior from a file or masks) and ``ranks`` (many
processes). Every name below is imported lazily, on first use: importing this package imports no generator
(nor torch, for ``entropy_split_torch`` / ``entropy_threshold_torch``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Every public name and the module that defines it, imported on first use (PEP 562): a run of one method
# imports that method's module only (see registry.get_generator), and no one pays for torch's.
_EXPORTS = {
    "cbst": ("cbst_pseudo_labels", "cbst_thresholds", "cbst_thresholds_from_histogram"),
    "dars": ("dars_pseudo_labels", "dars_target_counts", "dars_thresholds", "dars_thresholds_from_histogram"),
    "entropy": ("alpha_schedule", "entropy_pseudo_labels", "entropy_threshold", "entropy_threshold_from_histogram"),
    "entropy_online": ("classwise_entropy_split_torch", "entropy_split_torch", "entropy_threshold_torch"),
    "histogram": ("Float16Histogram",),
    "quality": ("PseudoQualityAccumulator", "pseudo_label_quality", "uncertainty_gap"),
    "registry": ("Histogram", "PseudoLabelGenerator", "generator_names", "get_generator", "register_generator"),
    "streaming": ("apply", "fit_thresholds"),
    "threshold": ("threshold_pseudo_labels",),
    "validation": ("IGNORE_LABEL",),
    "variance": (
        "variance_cutoff",
        "variance_cutoff_from_histogram",
        "variance_pseudo_labels",
        "variance_pseudo_labels_at_cutoff",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = sorted(_MODULE_OF)
