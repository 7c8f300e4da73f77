"""What a self-training round trains on: the pseudo-labels of ``labels.h5`` read by dataset index, the
labeled and pseudo-labeled step loaders zipped into one batch stream, and the BatchNorm statistics of a
representation head that pretraining never ran."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from labelpipe.config import TrainConfig
from labelpipe.context import StageContext
from labelpipe.data.dataset import DecodedCache, SegmentationDataset, collate, item_seed
from labelpipe.data.transforms import labeled_photometric, strong_photometric, weak_transform
from labelpipe.store.prediction_store import escape_id
from labelpipe.training.setup import labeled_index_map, step_loader

Batches = Callable[[int], Iterator[Any]]  # start step -> iterator of batches


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
        """(H, W) uint8 pseudo-labels (255: not kept) of the ``index``-th image."""
        return self._images()[escape_id(self.ids[index])]["label"][()]

    def weight(self, index: int) -> np.ndarray:
        """(H, W) float32 per-pixel weights of the ``index``-th image (stores of weighting methods)."""
        return self._images()[escape_id(self.ids[index])]["weight"][()].astype(np.float32)

    def has_weights(self) -> bool:
        return len(self.ids) > 0 and "weight" in self._images()[escape_id(self.ids[0])]


def zip_batches(a: Batches, b: Batches) -> Callable[[int], Iterator[tuple[Any, Any]]]:
    """start step -> pairs of ``a``'s and ``b``'s batches from that step on."""

    def batches(start: int):
        return zip(a(start), b(start), strict=False)

    return batches


def calibrate_representation(ctx: StageContext, model, labeled: list, cfg: TrainConfig, images: int = 64) -> None:
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


def _no_labels(index: int) -> None:
    """An online round's unlabeled masks: none (the dataset fills 255; the disk's masks are never read)."""
    return None


def round_batches(
    ctx: StageContext, k: int, labels_path: Path | None, cfg: TrainConfig, steps: int, weak_view: bool
) -> Callable[[int], Iterator[tuple[dict, dict]]]:
    """Round ``k``'s stream: start step -> (labeled batch, pseudo-labeled batch) pairs, each deterministic
    in (seed, round, step). ``labels_path`` None (an online round): the unlabeled masks are all 255, for
    the teacher to fill. The unlabeled images are weakly augmented (strongly, photometrically, with
    ``selftrain.strong_aug``; stronger in later rounds, DARS IT); with ``weak_view`` each unlabeled batch
    also carries ``image_weak``, the same geometry without the photometric part (what a teacher sees)."""
    config, st = ctx.config, ctx.config.selftrain
    labeled = ctx.source.split(ctx.roles["labeled"])
    unlabeled = ctx.source.split(config.predict.split or ctx.roles["unlabeled"])
    strength = 1.0 + 0.5 * (k - 1)  # DARS IT: stronger augmentation in later rounds
    weak = weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip)
    reader = LabelStoreReader(labels_path, [s.id for s in unlabeled]) if labels_path is not None else None
    cache = DecodedCache.of_mib(cfg.image_cache_mb)  # one budget for both streams
    labeled_ds = SegmentationDataset(
        ctx.source, labeled, weak, photometric=labeled_photometric(cfg.photometric), cache=cache
    )
    unlabeled_ds = SegmentationDataset(
        ctx.source,
        unlabeled,
        weak,
        photometric=strong_photometric(strength) if st.strong_aug else None,
        require_masks=False,
        masks=reader.label if reader is not None else _no_labels,
        weights=reader.weight if reader is not None and reader.has_weights() else None,
        pad_mask=True,
        weak_view=weak_view,  # the teacher's view: the same crop before the photometric part, one read
        cache=cache,
    )
    lab_seed = config.seed + 7919 * k
    lab_batches = step_loader(ctx, labeled_ds, cfg.batch_size, lab_seed, steps, labeled_index_map(ctx, cfg, lab_seed))
    unl_batches = step_loader(ctx, unlabeled_ds, cfg.batch_size, config.seed + 104729 * k, steps)
    return zip_batches(lab_batches, unl_batches)
