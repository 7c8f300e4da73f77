"""Labelling a run's prediction store (``labelpipe pseudolabel --run RUN`` and self-training's rounds):
the store is checked to be the run's current one, the prior comes from the run's labeled split, and the
ground truth (quality metrics, sample figures) from its data set where the store's images have masks.

No torch on this path (see :mod:`labelpipe.pseudo.labelling`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from labelpipe.context import StageContext, checked_model_path, class_prior, write_config
from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.labelling import (
    GroundTruth,
    Settings,
    begin_labels,
    finish_labels,
    label_store,
    labels_up_to_date,
)
from labelpipe.pseudo.ranks import Ranks
from labelpipe.store.atomic import sha256_file, sha256_json
from labelpipe.store.lock import run_lock, stage_name
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import PredictionStore


def label_run_store(
    ctx: StageContext,
    settings: Settings,
    store_path: Path,
    out_dir: Path,
    sharded: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Pseudo-labels of the run's store ``store_path`` into the stage directory ``out_dir`` (``labels.h5``,
    ``report.json``, plots), holding the directory's lock in the run (rank 0 takes it); up-to-date when
    its fingerprint matches. ``ctx.runtime``: anything with ``rank``, ``world`` and ``is_main`` (a
    ``labelpipe.runtime.Runtime`` or :class:`Ranks`). With ``sharded`` every rank labels its share of the
    images (the CLI under torchrun); otherwise rank 0 does it all (``selftrain``). Returns labels.h5."""
    run_dir, runtime = ctx.run_dir, ctx.runtime
    with run_lock(run_dir, stage_name(run_dir, out_dir), enabled=runtime.is_main):
        if not runtime.is_main and not sharded:
            return out_dir / "labels.h5"
        return _label_run_store(ctx, settings, store_path, StageDir(out_dir), sharded, force, quiet)


def _label_run_store(
    ctx: StageContext,
    settings: Settings,
    store_path: Path,
    stage: StageDir,
    sharded: bool,
    force: bool,
    quiet: bool,
) -> Path:
    config, run_dir, runtime, source = ctx.config, ctx.run_dir, ctx.runtime, ctx.source
    ranks = Ranks(runtime.rank, runtime.world) if sharded else Ranks()
    prior_split = config.pseudolabel.prior_from or ctx.roles["labeled"]
    store_hash = _store_hash(store_path, run_dir) if store_path.is_file() else ""  # checked before it is read
    with PredictionStore(store_path, source.num_classes, require=settings.generator.pass2_columns) as store:
        _check_store_model(run_dir, store_path, store.attrs)
        inputs = {
            **settings.fingerprint_fields(),
            "seed": settings.seed,
            "prior_from": prior_split,  # resolved: None means the labeled split
            "prior_ids": ctx.split_ids_fingerprint(prior_split),
            "store": store_hash,
        }
        fingerprint = sha256_json(inputs)
        if labels_up_to_date(stage, fingerprint, ranks, force, quiet):
            return stage.path / "labels.h5"
        prior = class_prior(ctx, prior_split)  # validates the prior's masks before anything is written
        write_config(ctx)
        # HDF5 cannot fail cleanly on a full disk: the labels (uint8, lzf) take well under half the store.
        begin_labels(stage, settings, fingerprint, inputs, ranks, reserve=store_path.stat().st_size // 2 + (1 << 20))
        truth = _ground_truth(ctx, store)
        report = label_store(store, stage.path, settings, source.classes, prior, ranks, truth, source.palette)
    return finish_labels(stage, settings, report, source.classes, ranks, quiet)


def _ground_truth(ctx: StageContext, store: PredictionStore) -> GroundTruth:
    """The masks of the store's images where every one has one (research splits such as DigitScapes'),
    and their RGB images for the sample figures."""
    source = ctx.source
    split = store.attrs.get("split", ctx.roles["unlabeled"])
    by_id = {s.id: s for s in source.split(split)} if split in source.splits else {}
    has_gt = bool(by_id) and all(i in by_id and by_id[i].mask is not None for i in store.ids)
    return GroundTruth(
        read_mask=(lambda i: source.read_mask(by_id[i].mask)) if has_gt else None,
        read_rgb=_rgb_reader(by_id) if by_id else None,
        sample_ids=set(by_id),
    )


def _rgb_reader(by_id: dict[str, Any]) -> Callable[[str], np.ndarray]:
    def read(image_id: str) -> np.ndarray:
        from labelpipe.data import read_image

        return read_image(by_id[image_id].image)

    return read


def _store_hash(store_path: Path, run_dir: Path) -> str:
    """The sha256 of the prediction store, checked: a store ``predict`` wrote must still be the file its
    manifest records (size, and hash unless untouched) and ``predict`` must have finished; a store made
    elsewhere (no predict manifest beside it) is hashed."""
    stage = StageDir(store_path.parent)
    manifest = stage.manifest()
    if manifest is None or manifest.get("stage") != "predict":
        return sha256_file(store_path)
    command = "predict" if store_path.parent == run_dir / "predict" else "selftrain"
    stage.check_output(store_path.name, f"labelpipe {command} --run {run_dir}")
    return manifest["outputs"][store_path.name]


def _check_store_model(run_dir: Path, store_path: Path, attrs: dict) -> None:
    """A store must come from the run's current model of its name (a re-pretrain makes it stale)."""
    name, made_by = attrs.get("model"), attrs.get("model_sha256")
    if not isinstance(name, str) or not made_by:
        return
    try:
        path = checked_model_path(run_dir, name)
    except LabelpipeError:
        return  # no such model in this run (a store from elsewhere): nothing to compare with
    current = (StageDir(path.parent).manifest() or {}).get("outputs", {}).get(path.name) or sha256_file(path)
    if current != made_by:
        command = "predict" if store_path.parent == run_dir / "predict" else "selftrain"
        raise LabelpipeError(
            f"{store_path}: made by an earlier {name} model (the run's model has changed since); run "
            f"`labelpipe {command} --run {run_dir}` to predict with the current one"
        )
