"""``labelpipe pseudolabel --method NAME``, NAME a registered generator (``labelpipe.pseudo.registry``).

Two verbs: :func:`run_pseudolabel` (a run's store, its data set's prior and ground truth, into
``RUN/pseudolabel/METHOD``) and :func:`pseudolabel_store` (``--predictions FILE.h5 --out DIR``: any
network's store, a prior from a file or a mask folder, no model, run or data set). Both call
:func:`labelpipe.pseudo.labelling.label_store`, which streams over the store in at most two passes
(thresholds from float16 histograms, then the labels and the report), in memory flat in the number and
the size of the images. Under torchrun (WORLD_SIZE > 1) every rank labels its shard of the images and
the thresholds and labels equal those of one process.

This path imports no torch (nor matplotlib unless plots are drawn): torch is loaded only to join and use
a process group when there are many processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.labelling import (
    Settings,
    begin_labels,
    finish_labels,
    label_store,
    labels_up_to_date,
    settings_from,
)
from labelpipe.pseudo.prior import prior_from_masks, read_prior
from labelpipe.pseudo.ranks import Ranks
from labelpipe.store.atomic import sha256_json
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import PredictionStore

if TYPE_CHECKING:
    from labelpipe.config import RunConfig


def run_pseudolabel(
    config: RunConfig,
    run_dir: Path,
    runtime: Any,
    force: bool = False,
    store_path: Path | None = None,
    out_dir: Path | None = None,
    alpha: float | None = None,
    quiet: bool = False,
    sharded: bool = False,
) -> Path:
    """Pseudo-labels of a run's store (default ``RUN/predict/predictions.h5``) into
    ``RUN/pseudolabel/METHOD`` (or ``out_dir``), ``alpha`` overriding the config's. ``runtime``: anything
    with ``rank``, ``world`` and ``is_main`` (a ``labelpipe.runtime.Runtime`` or :class:`Ranks`). With
    ``sharded`` every rank labels its share of the images (the CLI under torchrun)."""
    from labelpipe.context import open_context  # the data set's modules: not on the --predictions path
    from labelpipe.pseudo.run_store import label_run_store

    ctx = open_context(config, run_dir, runtime)
    settings = settings_from(ctx.config, alpha)  # with defaults that depend on the data resolved
    store_path = store_path or run_dir / "predict" / "predictions.h5"
    out_dir = out_dir or run_dir / "pseudolabel" / settings.method
    return label_run_store(ctx, settings, store_path, out_dir, sharded=sharded, force=force, quiet=quiet)


def pseudolabel_store(
    predictions: Path,
    out: Path,
    settings: Settings,
    prior: Path | None = None,
    prior_from: Path | None = None,
    ranks: Ranks = Ranks(),
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """``labelpipe pseudolabel --predictions FILE.h5 --out DIR``: label any prediction store (see
    :mod:`labelpipe.store.writer`) without a model, run or data set. The prior comes from ``prior``
    (json / npy) or the masks under ``prior_from``; methods other than dars use it only for the report
    (without one, a uniform prior is reported for them)."""
    if prior is not None and prior_from is not None:
        raise LabelpipeError("--prior and --prior-from: give one of them")
    with PredictionStore(predictions, require=settings.generator.pass2_columns) as store:
        classes = _store_classes(predictions, store.attrs)
        prior_values = _prior_values(settings, classes, prior, prior_from)
        stat = predictions.stat()
        inputs = {
            **settings.fingerprint_fields(),
            "seed": settings.seed,
            "prior": prior_values.tolist(),  # hashed by value: it comes from a file, not a split
            # size and mtime, not a hash: reading a 100 GB store twice to fingerprint it is not cheap
            "store": {"path": str(predictions.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        }
        inputs.pop("prior_from", None)  # --prior-from DIR: its masks are hashed as the prior's values
        fingerprint = sha256_json(inputs)
        stage = StageDir(out)
        if labels_up_to_date(stage, fingerprint, ranks, force, quiet):
            return out / "labels.h5"
        begin_labels(stage, settings, fingerprint, inputs, ranks)
        report = label_store(store, out, settings, classes, prior_values, ranks)
    return finish_labels(stage, settings, report, classes, ranks, quiet)


def _store_classes(predictions: Path, attrs: dict[str, Any]) -> list[str]:
    """The class names a store records (``class0``, ``class1``, ... where it names none)."""
    classes = [str(c) for c in attrs.get("classes") or []]
    C = attrs.get("num_classes")
    if not isinstance(C, int) or C < 1:
        raise LabelpipeError(f"{predictions}: the store's num_classes attribute is missing or invalid")
    return classes if len(classes) == C else [f"class{c}" for c in range(C)]


def _prior_values(settings: Settings, classes: list[str], prior: Path | None, prior_from: Path | None) -> np.ndarray:
    """(C,) the labeled class prior from ``--prior`` or ``--prior-from``; uniform where the method does not
    need one and none is given."""
    C = len(classes)
    if prior is not None:
        return read_prior(prior, classes)
    if prior_from is not None:
        return prior_from_masks(prior_from, C)
    if settings.generator.needs_prior:
        raise LabelpipeError(
            f"--method {settings.method} needs the labeled class prior: pass --prior FILE or --prior-from DIR"
        )
    return np.full(C, 1.0 / C)
