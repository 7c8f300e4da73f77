"""A run's model on a split -> ``predictions.h5`` in a stage directory (``predict``, and each
self-training round's ``predict/``).

Per pixel (ALGORITHMS.md section 1), with ``p = softmax(z / T)``: label = argmax p, conf = max p,
entropy = -sum p log p, variance = KL(p || p_aux); optional top-k. Inference is batched (AMP on
CUDA); HDF5 writes run in a writer thread; a killed run resumes after its last complete part.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import h5py
import torch

from labelpipe import __version__
from labelpipe.calibration import fit_temperature
from labelpipe.config import PredictConfig
from labelpipe.context import StageContext, load_trained_model, write_config
from labelpipe.data.base import SampleRef, preflight
from labelpipe.data.dataset import item_seed
from labelpipe.errors import LabelpipeError, disk_full_error, is_disk_full
from labelpipe.inference.loop import iterate_predictions
from labelpipe.runtime import all_gather_rows, barrier
from labelpipe.store.atomic import sha256_file, sha256_json
from labelpipe.store.columns import columns_to_numpy, pixel_columns
from labelpipe.store.lock import run_lock, stage_name
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import DEFAULT_COLUMNS, PartWriter, merge_parts


def calibrate(ctx: StageContext, model: torch.nn.Module, max_pixels: int = 500_000) -> dict:
    """Fit T on labeled validation pixels: at most ``max_pixels / len(val)`` of each image, drawn by a
    generator seeded by (seed, image), so memory stays bounded on Cityscapes-sized splits.

    Under torchrun each rank infers its share of the images; the pixels are gathered in image order, so
    every rank fits the same T as one process would.
    """
    samples = ctx.source.split(ctx.roles["val"])
    rt, ignore = ctx.runtime, ctx.source.ignore_index
    per_image = max(1, max_pixels // max(1, len(samples)))
    mine = list(range(rt.rank, len(samples), rt.world))
    logits = [torch.zeros(0, ctx.source.num_classes)]
    targets, images = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for batch in iterate_predictions(
        model,
        ctx.source,
        [samples[i] for i in mine],
        rt.device,
        ctx.config.train.crop_size,
        ctx.config.predict.batch_size,
        require_masks=True,
    ):
        for local, mask, main in zip(batch.indices, batch.masks, batch.main, strict=True):
            index = mine[local]
            pick = (mask.flatten() != ignore).nonzero()[:, 0]
            if pick.numel() > per_image:
                draw = torch.Generator().manual_seed(item_seed(ctx.config.seed, 0, index))
                pick = pick[torch.randperm(pick.numel(), generator=draw)[:per_image].to(pick.device)]
            logits.append(main.flatten(1).T[pick].cpu())
            targets.append(mask.flatten()[pick].cpu())
            images.append(torch.full((pick.numel(),), index, dtype=torch.long))
    z, y = all_gather_rows(torch.cat(logits)), all_gather_rows(torch.cat(targets))
    image = all_gather_rows(torch.cat(images))
    if y.numel() == 0:
        raise LabelpipeError(
            f"split '{ctx.roles['val']}' has no labeled pixels to fit the temperature on; use --temperature NUMBER"
        )
    order = torch.argsort(image, stable=True)  # image order, whichever rank inferred the image
    return fit_temperature(z[order], y[order])


def predict_store(ctx: StageContext, model_name: str | None, out_dir: Path, force: bool = False) -> Path:
    """The run's model ``model_name`` (default the latest) on the predict split into
    ``out_dir/predictions.h5``: predicted, resumed, or reported up to date, while holding the
    directory's lock in the run. Every rank calls it; returns the store's path."""
    with run_lock(ctx.run_dir, stage_name(ctx.run_dir, out_dir), enabled=ctx.runtime.is_main):
        return _predict_store(ctx, model_name, StageDir(out_dir), force)


def _predict_store(ctx: StageContext, model_name: str | None, stage: StageDir, force: bool) -> Path:
    runtime, pcfg = ctx.runtime, ctx.config.predict
    _check_options(pcfg, ctx.source.num_classes)
    split = pcfg.split or ctx.roles["unlabeled"]
    samples = ctx.source.split(split)
    name, model, weights = load_trained_model(ctx, model_name)
    store_path = stage.path / "predictions.h5"
    inputs = {
        "model": name,
        "weights_sha256": sha256_file(weights),
        "split": split,
        "split_ids": ctx.split_ids_fingerprint(split),
        "temperature": pcfg.temperature,
        "topk": pcfg.topk,
    }
    fingerprint = sha256_json(inputs)
    if not force and stage.is_up_to_date(fingerprint):
        if runtime.is_main:
            print(f"predict: up to date ({store_path}); use --force to redo")
        return store_path
    preflight(samples, with_masks=False)  # validate, then act: nothing is removed for a split that fails
    previous = stage.manifest()
    if runtime.is_main and stage.path.exists() and (force or (previous and previous.get("fingerprint") != fingerprint)):
        shutil.rmtree(stage.path)  # other inputs: the parts on disk belong to another prediction
    barrier()
    write_config(ctx)
    if runtime.is_main:
        stage.begin("predict", fingerprint, inputs)

    calibration, temperature = _temperature(ctx, model)
    parts_dir = stage.path / "parts"
    _write_parts(ctx, model, samples, parts_dir, temperature)
    barrier()
    if runtime.is_main:
        columns = list(DEFAULT_COLUMNS) + (["topk_prob", "topk_class"] if pcfg.topk else [])
        attrs = {
            "classes": ctx.source.classes,
            "num_classes": ctx.source.num_classes,
            "columns": columns,
            "temperature": temperature,
            "model": name,
            "model_sha256": inputs["weights_sha256"],
            "labelpipe_version": __version__,
            "split": split,
            "calibration": calibration,
        }
        merge_parts(sorted(parts_dir.glob("part-*.h5")), store_path, [s.id for s in samples], attrs)
        shutil.rmtree(parts_dir)
        stage.finish(["predictions.h5"], {"images": len(samples), "temperature": temperature, **calibration})
    barrier()
    return store_path


def _check_options(pcfg: PredictConfig, num_classes: int) -> None:
    if pcfg.batch_size < 1:  # PredictConfig does not bound it
        raise LabelpipeError(f"predict.batch_size={pcfg.batch_size}: must be >= 1")
    if pcfg.topk > num_classes:
        raise LabelpipeError(f"--topk {pcfg.topk}: the data set has only {num_classes} classes")
    if pcfg.temperature != "auto" and not pcfg.temperature > 0:
        raise LabelpipeError(f"--temperature {pcfg.temperature}: must be > 0 (or 'auto')")


def _temperature(ctx: StageContext, model: torch.nn.Module) -> tuple[dict[str, Any], float]:
    """(the calibration's numbers, T): fitted on the val pixels with ``temperature: auto``, else the
    config's number (and no calibration)."""
    if ctx.config.predict.temperature != "auto":
        return {}, float(ctx.config.predict.temperature)
    calibration = calibrate(ctx, model)
    temperature = calibration["temperature"]
    if ctx.runtime.is_main:
        print(
            f"temperature {temperature:.3f}: "
            f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}, "
            f"ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}"
        )
    return calibration, temperature


def _write_parts(
    ctx: StageContext, model: torch.nn.Module, samples: list[SampleRef], parts_dir: Path, temperature: float
) -> None:
    """This rank's share of ``samples`` not yet in ``parts_dir``, as part files (the resume unit)."""
    config, runtime, pcfg = ctx.config, ctx.runtime, ctx.config.predict
    # Whole batches per part: a resumed run then sees the same batches as an uninterrupted one, so its
    # logits (and the store) are identical to the last bit.
    per_part = pcfg.batch_size * math.ceil(pcfg.images_per_part / pcfg.batch_size)
    writer = PartWriter(parts_dir, rank=runtime.rank, images_per_part=per_part, num_classes=ctx.source.num_classes)
    done = set(writer.done_ids())
    mine = [s for s in samples[runtime.rank :: runtime.world] if s.id not in done]
    if done and runtime.is_main:
        print(f"resuming predict: {len(done)} images already in {parts_dir}")
    from rich.progress import Progress

    with Progress(disable=not runtime.is_main) as progress:
        task = progress.add_task("predict", total=len(samples) // runtime.world, completed=len(done))
        try:
            try:
                for batch in iterate_predictions(
                    model,
                    ctx.source,
                    mine,
                    runtime.device,
                    config.train.crop_size,
                    pcfg.batch_size,
                    amp=config.train.amp,
                ):
                    for image_id, main, aux in zip(batch.ids, batch.main, batch.aux, strict=True):
                        writer.add(image_id, columns_to_numpy(pixel_columns(main, aux, temperature, pcfg.topk)))
                    progress.advance(task, len(batch.ids))
                    _test_kill_after_part(writer)
            except BaseException:
                writer.close(complete=False)  # stop the writer; the complete parts stay for a resume
                raise
            writer.close()
        except OSError as exc:
            if is_disk_full(exc):
                raise _parts_disk_full(parts_dir, len(samples) // runtime.world) from exc
            raise


def _test_kill_after_part(writer: PartWriter) -> None:
    """Test hook: ``LABELPIPE_TEST_KILL_AFTER_PART=k`` SIGKILLs this process once k parts are on disk
    (written by the writer thread, in order), so the kill/resume test kills at a known point."""
    kill_at = os.environ.get("LABELPIPE_TEST_KILL_AFTER_PART")
    if not kill_at or writer.next_part < int(kill_at):
        return
    while len(writer.parts()) < int(kill_at) and writer.error is None and writer.thread.is_alive():
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)


def _parts_disk_full(parts_dir: Path, total: int) -> LabelpipeError:
    """Disk full while writing parts: the space the rest takes, estimated from the parts already written."""
    parts = list(parts_dir.glob("part-*.h5"))
    done = 0
    for part in parts:
        with h5py.File(part, "r") as fh:
            done += len(fh["index/ids"])
    size = sum(p.stat().st_size for p in parts)
    per_image = size / done if done else None
    # The remaining parts, then the merged store (about as large as all the parts together).
    needed = int(per_image * ((total - done) + total)) if per_image else None
    return disk_full_error(parts_dir, needed)
