"""What every stage shares: opening the data set, the run directory, models by name, the class prior."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labelpipe.config import RunConfig, config_to_yaml
from labelpipe.data import DatasetSource, open_source
from labelpipe.errors import LabelpipeError
from labelpipe.store.atomic import atomic_write_json, atomic_write_text, sha256_json
from labelpipe.store.lock import check_run_dir
from labelpipe.store.manifest import StageDir

if TYPE_CHECKING:  # torch, the models and checkpoints load lazily: pseudolabel's path never imports torch
    import torch

    from labelpipe.models import DeepLabV3Plus
    from labelpipe.runtime import Runtime


@dataclass
class StageContext:
    config: RunConfig
    run_dir: Path
    runtime: Runtime
    source: DatasetSource
    roles: dict[str, str] = field(default_factory=dict)

    def split_ids_fingerprint(self, split: str) -> str:
        return sha256_json([s.id for s in self.source.split(split)])


def open_context(config: RunConfig, run_dir: Path, runtime: Runtime) -> StageContext:
    """The data set and protocol of ``config``, validated; writes nothing (see :func:`write_config`)."""
    check_run_dir(run_dir)
    data = config.data
    source = open_source(data.root, data.kind, data.digitscapes.model_dump(), default_root=data.resolved_root())
    roles = source.protocol(data.protocol)
    if config.train.crop_size is None:
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"crop_size": default_crop(source, roles["labeled"])})}
        )
    return StageContext(config=config, run_dir=run_dir, runtime=runtime, source=source, roles=roles)


def write_config(ctx: StageContext) -> None:
    """Record the resolved config in ``RUN/config.yaml``: called when a stage really starts (its inputs
    passed their checks), so a rejected command never changes what later commands inherit."""
    if ctx.runtime.is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.run_dir / "config.yaml", config_to_yaml(ctx.config))


def default_crop(source: DatasetSource, split: str, largest: int = 512) -> int:
    """The crop when none is configured: the first labeled image's longer side, at most ``largest``."""
    from PIL import Image

    sample = source.split(split)[0]
    try:
        with Image.open(sample.image) as im:
            return min(largest, max(im.size))
    except (OSError, ValueError):
        return largest  # the preflight check names the file


def model_from_config(config: RunConfig, num_classes: int, with_backbone_weights: bool = True) -> DeepLabV3Plus:
    m = config.model
    from labelpipe.models import build_model

    return build_model(
        num_classes,
        m.backbone,
        m.output_stride,
        m.aspp_rates,
        m.rep_dim,
        m.backbone_weights if with_backbone_weights else None,
        scale=m.scale,
        aux_level=m.aux_level,
    )


def model_path(run_dir: Path, name: str) -> Path:
    """``pretrain`` -> pretrain/model.safetensors; ``round-K`` -> selftrain/round-K/train/model.safetensors."""
    if name == "pretrain":
        return run_dir / "pretrain" / "model.safetensors"
    if name.startswith("round-"):
        return run_dir / "selftrain" / name / "train" / "model.safetensors"
    raise LabelpipeError(f"--model {name}: unknown model; use pretrain or round-K (e.g. round-2)")


def rebuild_command(run_dir: Path, name: str) -> str:
    """The command that (re)makes model ``name`` of a run."""
    stage = "pretrain" if name == "pretrain" else "selftrain"
    return f"labelpipe {stage} --run {run_dir}"


def latest_model_name(run_dir: Path) -> str:
    """The last finished model: the highest round whose training is done, else pretrain (a round that was
    interrupted or failed is never picked)."""
    rounds = sorted(
        (int(p.parent.parent.name.split("-")[1]), p.parent.parent.name)
        for p in run_dir.glob("selftrain/round-*/train/model.safetensors")
        if p.parent.parent.name.split("-")[1].isdigit() and StageDir(p.parent).status() == "done"
    )
    if rounds:
        return rounds[-1][1]
    if (run_dir / "pretrain" / "model.safetensors").is_file():
        return "pretrain"
    raise LabelpipeError(f"{run_dir}: no trained model in this run; run `labelpipe pretrain --run {run_dir}` first")


def checked_model_path(run_dir: Path, name: str) -> Path:
    """``model_path`` after checking the file is the one its stage wrote (size, and hash unless untouched)."""
    path = model_path(run_dir, name)
    if not path.is_file():
        raise LabelpipeError(f"{path}: model file not found; run `{rebuild_command(run_dir, name)}` first")
    return StageDir(path.parent).check_output(path.name, rebuild_command(run_dir, name))


def load_trained_model(ctx: StageContext, name: str | None) -> tuple[str, DeepLabV3Plus, Path]:
    name = name or latest_model_name(ctx.run_dir)
    path = checked_model_path(ctx.run_dir, name)
    from labelpipe.models import build_model_from_metadata
    from labelpipe.runtime import place
    from labelpipe.store.checkpoint import load_model_weights, read_model_metadata

    meta = read_model_metadata(path)
    if meta.get("num_classes") not in (None, ctx.source.num_classes):
        raise LabelpipeError(
            f"{path}: model has {meta['num_classes']} classes but the data set has {ctx.source.num_classes}; "
            "use the data set the model was trained on"
        )
    model = model_from_config(ctx.config, ctx.source.num_classes, with_backbone_weights=False)
    if "model" in meta:  # the architecture the weights were trained with wins over the current config
        model = build_model_from_metadata(ctx.source.num_classes, meta["model"])
    load_model_weights(path, model)
    place(model, ctx.runtime.device, ctx.config.train.channels_last).eval()  # NHWC kernels, as in training
    return name, model, path


def prior_cache_key(ctx: StageContext, split: str) -> str:
    """What the class prior of ``split`` depends on: the data root, the split's ids and the bytes of its masks.

    Another ``--data`` with the same ids, or an edited mask, gives another key (so its masks are read,
    and validated, again). Hashing the mask files is much cheaper than decoding them.
    """
    digest = hashlib.sha256()
    digest.update(str(Path(ctx.source.root).resolve()).encode())
    digest.update(f"\0{split}\0{ctx.source.num_classes}\0{ctx.source.ignore_index}".encode())
    for sample in ctx.source.split(split):
        digest.update(f"\0{sample.id}\0".encode())
        if sample.mask is not None and sample.mask.is_file():
            digest.update(sample.mask.read_bytes())
    return f"{split}:{digest.hexdigest()}"


def _read_stats_cache(ctx: StageContext) -> dict:
    """The run's ``class_prior.json`` (the class prior and class presence of splits, by cache key); empty when
    missing, and when unreadable (reported: it is rebuilt from the masks)."""
    cache = ctx.run_dir / "class_prior.json"
    if not cache.is_file():
        return {}
    try:
        stored = json.loads(cache.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a mapping")
        return stored
    except (OSError, ValueError) as exc:
        print(f"note: {cache} is unreadable ({type(exc).__name__}); rebuilding it from the masks")
        return {}


def _image_class_counts(ctx: StageContext, split: str, needs: str) -> Iterator[np.ndarray]:
    """(C,) int64 labeled-pixel counts per class (255 excluded) of each image of ``split``, in order."""
    num_classes = ctx.source.num_classes
    for sample in ctx.source.split(split):
        if sample.mask is None:
            raise LabelpipeError(f"{sample.image}: split '{split}' has no mask here; {needs} needs masks")
        mask = ctx.source.read_mask(sample.mask)
        yield np.bincount(mask[mask != ctx.source.ignore_index].ravel(), minlength=num_classes)[:num_classes]


def class_prior(ctx: StageContext, split: str) -> np.ndarray:
    """Fraction of labeled pixels of each class (255 excluded), from the split's masks; cached in the run
    under :func:`prior_cache_key` (an unreadable cache is rebuilt)."""
    key = prior_cache_key(ctx, split)
    stored = _read_stats_cache(ctx)
    if key in stored:
        return np.asarray(stored[key], np.float64)
    counts = np.zeros(ctx.source.num_classes, np.int64)
    for image_counts in _image_class_counts(ctx, split, "the class prior"):
        counts += image_counts
    if counts.sum() == 0:
        raise LabelpipeError(f"split '{split}': masks contain no labeled pixels; the class prior is undefined")
    prior = counts / counts.sum()
    stored[key] = prior.tolist()
    if ctx.runtime.is_main:
        atomic_write_json(ctx.run_dir / "class_prior.json", stored)
    return prior


def class_presence(ctx: StageContext, split: str) -> np.ndarray:
    """(N, C) bool: which classes each image of ``split`` contains (255 excluded), in the split's order; cached in
    the run beside the class prior (:func:`class_prior`), under the same key."""
    key = "presence|" + prior_cache_key(ctx, split)
    stored = _read_stats_cache(ctx)
    count = len(ctx.source.split(split))
    present = np.zeros((count, ctx.source.num_classes), bool)
    if key in stored and len(stored[key]) == count:
        for row, classes in enumerate(stored[key]):
            present[row, classes] = True
        return present
    for row, image_counts in enumerate(_image_class_counts(ctx, split, "class presence")):
        present[row] = image_counts > 0
    stored[key] = [np.flatnonzero(row).tolist() for row in present]
    if ctx.runtime.is_main:
        atomic_write_json(ctx.run_dir / "class_prior.json", stored)
    return present


def load_run_model(run_dir: Path, name: str | None) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    """(name, eval-mode model on CPU, metadata) from the weights file alone (no data set needed)."""
    from labelpipe.models import build_model_from_metadata
    from labelpipe.store.checkpoint import load_model_weights, read_model_metadata

    if not run_dir.is_dir():
        raise LabelpipeError(f"{run_dir}: no such run directory; pass the run of a `labelpipe pretrain`")
    name = name or latest_model_name(run_dir)
    path = checked_model_path(run_dir, name)  # the file its stage wrote, not a truncated or swapped one
    meta = read_model_metadata(path)
    if "model" not in meta or "num_classes" not in meta:
        raise LabelpipeError(f"{path}: no labelpipe metadata (model, classes); train it with labelpipe")
    model = build_model_from_metadata(meta["num_classes"], meta["model"])
    load_model_weights(path, model)
    return name, model.eval(), meta
