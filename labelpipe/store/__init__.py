"""On-disk artifacts: atomic files, stage manifests, checkpoints, the HDF5 prediction store.

``PredictionWriter`` (:mod:`labelpipe.store.writer`) writes a prediction store from any network's output,
for ``labelpipe pseudolabel --predictions``; ``PredictionStore`` reads one. Both load on first use, so that
importing a sibling module (``labelpipe.store.atomic``) does not import h5py.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictionStore", "PredictionWriter"]


def __getattr__(name: str) -> Any:
    if name == "PredictionWriter":
        from labelpipe.store.writer import PredictionWriter

        return PredictionWriter
    if name == "PredictionStore":
        from labelpipe.store.prediction_store import PredictionStore

        return PredictionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
