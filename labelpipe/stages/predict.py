"""``labelpipe predict``: a run's model on the unlabeled split -> ``RUN/predict/predictions.h5``.

The work (inference, temperature, the resumable part files, the store) is
:func:`labelpipe.inference.predictions.predict_store`, which self-training's rounds call too.
"""

from __future__ import annotations

from pathlib import Path

from labelpipe.config import RunConfig
from labelpipe.context import open_context
from labelpipe.inference.predictions import predict_store
from labelpipe.runtime import Runtime


def run_predict(
    config: RunConfig,
    run_dir: Path,
    runtime: Runtime,
    force: bool = False,
    model_name: str | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Predict with the run's model ``model_name`` (default the latest) into ``RUN/predict`` (or
    ``out_dir``), resume a killed prediction, or report it up to date; returns the store's path."""
    ctx = open_context(config, run_dir, runtime)
    return predict_store(ctx, model_name, out_dir or run_dir / "predict", force)
