"""``labelpipe selftrain --rounds K``: rounds of predict -> pseudolabel -> retrain.

Round k (``selftrain/round-k/``): ``predict/`` with the current model, ``pseudolabel/`` with the
method and the round's labeling ratio ``alphas[k-1]``, then ``train/``: starting from the previous
round's weights, on equal batches of labeled (or source) images and pseudo-labeled unlabeled images.

One training step is :class:`labelpipe.training.selftrain_step.SelftrainStep`: the teacher, the
targets (stored or online pseudo-labels, denoising), CutMix, one student forward and the round's loss
terms (supervised + unsupervised CE/SCE or rectified [+ contrastive]; ``labelpipe.training.terms``).
This module owns the rounds: predict, pseudolabel, the data loaders and the training loop around it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from labelpipe.config import RunConfig
from labelpipe.context import (
    StageContext,
    checked_model_path,
    class_prior,
    model_path,
    open_context,
    write_config,
)
from labelpipe.data.base import preflight
from labelpipe.data.dataset import SegmentationDataset, collate, item_seed
from labelpipe.data.transforms import strong_photometric, weak_transform
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.inference.predictions import predict_store
from labelpipe.pseudo.labelling import settings_from
from labelpipe.pseudo.run_store import label_run_store
from labelpipe.runtime import Runtime, all_gather_rows, barrier, seed_everything
from labelpipe.store.atomic import atomic_write_json, sha256_file, sha256_json
from labelpipe.store.checkpoint import load_model_weights, save_model
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import escape_id
from labelpipe.training.curves import round_history
from labelpipe.training.loop import TrainJob, train
from labelpipe.training.selftrain_step import SelftrainStep
from labelpipe.training.setup import for_training, make_validator, model_metadata, step_loader


class LabelStoreReader:
    """Pseudo-labels (and weights) of ``labels.h5`` by dataset index; opens lazily per process."""

    def __init__(self, path: Path, ids: list[str]) -> None:
        self.path, self.ids = path, ids
        self._file: h5py.File | None = None
        self._pid = -1

    def _images(self) -> h5py.Group:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["images"]

    def label(self, index: int) -> np.ndarray:
        return self._images()[escape_id(self.ids[index])]["label"][()]

    def weight(self, index: int) -> np.ndarray:
        return self._images()[escape_id(self.ids[index])]["weight"][()].astype(np.float32)

    def has_weights(self) -> bool:
        return len(self.ids) > 0 and "weight" in self._images()[escape_id(self.ids[0])]


def _zip_batches(a, b):
    def batches(start: int):
        return zip(a(start), b(start), strict=False)

    return batches


def calibrate_representation(ctx: StageContext, model, labeled: list, cfg, images: int = 64) -> None:
    """BatchNorm statistics of a representation head that pretraining never ran (see the model's method):
    from weakly augmented crops of the first labeled images, deterministic in the seed."""
    dataset = SegmentationDataset(ctx.source, labeled, weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip))
    n = min(images, len(dataset))
    keys = [(i, item_seed(ctx.config.seed, -1, i)) for i in range(n)]
    device = ctx.runtime.device

    def batches():
        for start in range(0, n, cfg.batch_size):
            yield collate([dataset[key] for key in keys[start : start + cfg.batch_size]])["image"].to(device)

    if model.calibrate_representation(batches()) and ctx.runtime.is_main:
        print(f"calibrated the representation head's BatchNorm statistics on {n} labeled images")


def train_round(ctx: StageContext, k: int, init_model: Path, labels_path: Path, out: StageDir) -> dict:
    config, rt = ctx.config, ctx.runtime
    cfg, st = config.train, config.selftrain
    if st.lr is not None:  # rounds fine-tune a trained model: often at a lower rate than pretraining
        cfg = cfg.model_copy(update={"lr": st.lr})
    steps = st.steps or cfg.steps
    # What this round reads must be what the earlier steps wrote (never a truncated or swapped file).
    labels_stage = StageDir(labels_path.parent)
    labels_stage.check_output(labels_path.name, f"labelpipe selftrain --run {ctx.run_dir}")
    # ... and made from the round's current prediction store (the labels record the store's hash).
    store_stage = StageDir(labels_path.parent.parent / "predict")
    made_from = (labels_stage.manifest() or {}).get("inputs", {}).get("store")
    store_hash = (store_stage.manifest() or {}).get("outputs", {}).get("predictions.h5")
    if made_from and store_hash and made_from != store_hash:
        raise LabelpipeError(
            f"{labels_path}: made from another prediction store than {store_stage.path / 'predictions.h5'}; "
            f"run `labelpipe selftrain --run {ctx.run_dir}` again to relabel"
        )
    labeled = ctx.source.split(ctx.roles["labeled"])
    unlabeled = ctx.source.split(config.predict.split or ctx.roles["unlabeled"])
    inputs = {
        "round": k,
        "init": sha256_file(init_model),
        "labels": sha256_file(labels_path),
        "selftrain": st.fingerprint_fields(),
        "seed": config.seed,
        "train": cfg.fingerprint_fields(),
    }
    fingerprint = sha256_json(inputs)
    if out.is_up_to_date(fingerprint):
        if rt.is_main:
            print(f"round {k} train: up to date ({out.path})")
        return out.manifest().get("summary", {})
    if rt.is_main:
        out.begin("selftrain-train", fingerprint, inputs)

    seed_everything(config.seed + k)
    from labelpipe.context import model_from_config

    model = model_from_config(config, ctx.source.num_classes, with_backbone_weights=False)
    load_model_weights(init_model, model)
    net = for_training(model, rt, cfg, uses_rep=SelftrainStep.needs_student_rep(st))
    if SelftrainStep.needs_student_rep(st) or st.denoise:
        calibrate_representation(ctx, model, labeled, cfg)
    objective = SelftrainStep.build(
        config.model_copy(update={"train": cfg}),
        net,
        model,
        ctx.source.num_classes,
        ctx.source.ignore_index,
        rt.device,
        round_index=k,
        total_steps=steps,
        rank=rt.rank,
        world=rt.world,
        gather=all_gather_rows if rt.distributed else None,
    )
    teacher = objective.teacher

    strength = 1.0 + 0.5 * (k - 1)  # DARS IT: stronger augmentation in later rounds
    weak = weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip)
    reader = LabelStoreReader(labels_path, [s.id for s in unlabeled])
    labeled_ds = SegmentationDataset(ctx.source, labeled, weak)
    unlabeled_ds = SegmentationDataset(
        ctx.source,
        unlabeled,
        weak,
        photometric=strong_photometric(strength) if st.strong_aug else None,
        require_masks=False,
        masks=reader.label,
        weights=reader.weight if reader.has_weights() else None,
        pad_mask=True,
    )
    # The teacher sees the weak view: the same geometry without the photometric part.
    unlabeled_weak_ds = SegmentationDataset(ctx.source, unlabeled, weak, require_masks=False, masks=reader.label)

    lab_batches = step_loader(ctx, labeled_ds, cfg.batch_size, config.seed + 7919 * k, steps)
    unl_batches = step_loader(ctx, unlabeled_ds, cfg.batch_size, config.seed + 104729 * k, steps)
    if teacher is not None and st.strong_aug:
        weak_batches = step_loader(ctx, unlabeled_weak_ds, cfg.batch_size, config.seed + 104729 * k, steps)

        def unl_with_weak(start: int):
            for strong, weak_batch in zip(unl_batches(start), weak_batches(start), strict=False):
                strong["image_weak"] = weak_batch["image"]
                yield strong

        batches = _zip_batches(lab_batches, unl_with_weak)
    else:
        batches = _zip_batches(lab_batches, unl_batches)

    def after_step(step: int) -> None:
        if teacher is not None:
            teacher.update(net, step)

    try:
        last_val = train(
            TrainJob(
                stage_dir=out.path,
                model=net,
                total_steps=steps,
                batches=batches,
                objective=objective,
                cfg=cfg,
                runtime=rt,
                fingerprint=fingerprint,
                validate=make_validator(ctx),
                extras=objective.components(),
                after_step=after_step,
                description=f"round {k}",
                curve_rounds=lambda: round_history(ctx.run_dir / "selftrain", k),
            )
        )
    except BaseException as exc:
        if rt.is_main and not isinstance(exc, KeyboardInterrupt | Interrupted):
            out.fail(f"{type(exc).__name__}: {exc}")
        raise
    if rt.is_main:
        save_model(out.path / "model.safetensors", model, model_metadata(config, ctx, f"round-{k}"))
        atomic_write_json(out.path / "metrics.json", last_val)
        out.finish(["model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl"], last_val)
    barrier()
    return last_val


def run_selftrain(config: RunConfig, run_dir: Path, runtime: Runtime, force: bool = False) -> dict:
    ctx = open_context(config, run_dir, runtime)
    with run_lock(run_dir, "selftrain", enabled=runtime.is_main):
        return _run_selftrain(ctx, run_dir, runtime, force)


def _run_selftrain(ctx: StageContext, run_dir: Path, runtime: Runtime, force: bool) -> dict:
    config = ctx.config  # with defaults that depend on the data resolved
    st = config.selftrain
    if not model_path(run_dir, "pretrain").is_file():
        raise LabelpipeError(f"{run_dir}: no pretrained model; run `labelpipe pretrain --run {run_dir}` first")
    # Validate, then act: the model, the data and the masks are checked before --force removes the rounds.
    checked_model_path(run_dir, "pretrain")
    preflight(ctx.source.split(ctx.roles["labeled"]))
    preflight(ctx.source.split(config.predict.split or ctx.roles["unlabeled"]), with_masks=False)
    class_prior(ctx, ctx.roles["labeled"])
    if force and runtime.is_main and (run_dir / "selftrain").exists():
        shutil.rmtree(run_dir / "selftrain")
    barrier()
    write_config(ctx)
    rounds: dict[str, Any] = {}
    previous = "pretrain"
    pl_config = config.model_copy(update={"pseudolabel": config.pseudolabel.model_copy(update={"method": st.method})})
    pl_ctx = replace(ctx, config=pl_config)  # the rounds label with selftrain's method
    for k in range(1, st.rounds + 1):
        round_dir = run_dir / "selftrain" / f"round-{k}"
        alpha = st.alphas[min(k - 1, len(st.alphas) - 1)]
        store = predict_store(ctx, previous, round_dir / "predict")
        settings = settings_from(pl_config, alpha)
        labels = label_run_store(pl_ctx, settings, store, round_dir / "pseudolabel", quiet=not runtime.is_main)
        barrier()
        init = checked_model_path(run_dir, previous)
        rounds[f"round-{k}"] = train_round(ctx, k, init, labels, StageDir(round_dir / "train"))
        previous = f"round-{k}"
    return rounds
