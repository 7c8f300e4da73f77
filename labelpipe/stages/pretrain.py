"""``labelpipe pretrain``: supervised training on the labeled (or source) split.

Loss: CE on the main head + ``aux_weight`` x CE on the auxiliary head (ignore 255), class-weighted when
``train.class_balance`` > 0 (:func:`labelpipe.losses.class_balance.class_balance_weights`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.nn.functional as F

from labelpipe.config import SELECTION_FILE, RunConfig
from labelpipe.context import StageContext, class_prior, model_from_config, open_context, write_config
from labelpipe.data.base import preflight
from labelpipe.data.dataset import DecodedCache, SegmentationDataset
from labelpipe.data.transforms import labeled_photometric, weak_transform
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.runtime import Runtime, barrier, seed_everything
from labelpipe.store.atomic import atomic_write_json, sha256_json
from labelpipe.store.checkpoint import save_model
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir
from labelpipe.training.loop import TrainJob, read_log, train
from labelpipe.training.setup import (
    for_training,
    labeled_index_map,
    make_validator,
    model_metadata,
    step_loader,
    supervised_class_weights,
)


def run_pretrain(
    config: RunConfig, run_dir: Path, runtime: Runtime, force: bool = False, pause_at: int | None = None
) -> dict:
    """Train (or resume) the supervised model of ``config`` in ``run_dir/pretrain``; with ``pause_at`` (a
    step before the end) stop there, checkpointed and marked paused, and return that step's validation."""
    if config.select is not None:
        return _select(config, run_dir, runtime, force)
    ctx = open_context(config, run_dir, runtime)
    with run_lock(run_dir, "pretrain", enabled=runtime.is_main):
        return _pretrain(ctx, run_dir, runtime, force, pause_at)


def _pretrain(ctx: StageContext, run_dir: Path, runtime: Runtime, force: bool, pause_at: int | None = None) -> dict:
    config = ctx.config  # with defaults that depend on the data resolved
    cfg = config.train
    labeled = ctx.roles["labeled"]
    samples = ctx.source.split(labeled)
    stage = StageDir(run_dir / "pretrain")
    inputs = {
        "seed": config.seed,
        # fingerprint_fields: a setting added later, at its default, leaves earlier runs up to date
        "data": config.data.fingerprint_fields(),
        "model": config.model.fingerprint_fields(),
        "train": cfg.fingerprint_fields(),
        "split": labeled,
        "split_ids": ctx.split_ids_fingerprint(labeled),
    }
    fingerprint = sha256_json(inputs)
    if not force and stage.is_up_to_date(fingerprint):
        if runtime.is_main:
            print(f"pretrain: up to date ({stage.path}); use --force to redo")
        return stage.manifest().get("summary", {})
    paused = stage.paused_at(fingerprint)
    if not force and pause_at is not None and paused is not None and paused >= pause_at:
        if runtime.is_main:
            print(f"pretrain: paused at step {paused} ({stage.path}); up to date for a choice at step {pause_at}")
        return stage.manifest().get("summary", {})
    # Validate, then act: the data is checked before --force removes anything.
    preflight(samples)
    preflight(ctx.source.split(ctx.roles["val"]))
    class_prior(ctx, labeled)  # reads every labeled mask once: bad values fail here, not at step 5,000
    if force and runtime.is_main and stage.path.exists():
        shutil.rmtree(stage.path)
    barrier()  # no rank reads the checkpoint of a run that --force is removing
    write_config(ctx)
    if runtime.is_main:
        stage.begin("pretrain", fingerprint, inputs)

    seed_everything(config.seed)
    model = model_from_config(config, ctx.source.num_classes)
    net = for_training(model, runtime, cfg, uses_rep=False)
    dataset = SegmentationDataset(
        ctx.source,
        samples,
        weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip),
        photometric=labeled_photometric(cfg.photometric),
        cache=DecodedCache.of_mib(cfg.image_cache_mb),
    )
    ignore = ctx.source.ignore_index
    weight = supervised_class_weights(ctx, cfg, runtime.device)  # None: plain CE

    def objective(batch: dict, step: int):
        images = batch["image"].to(runtime.device, non_blocking=True)
        masks = batch["mask"].to(runtime.device, non_blocking=True)
        out = net(images, with_rep=False)  # no loss reads the representation
        loss_main = F.cross_entropy(out.main.float(), masks, weight=weight, ignore_index=ignore)
        loss_aux = F.cross_entropy(out.aux.float(), masks, weight=weight, ignore_index=ignore)
        loss = loss_main + cfg.aux_weight * loss_aux
        return loss, {
            "loss_main": float(loss_main.detach()),
            "loss_aux": float(loss_aux.detach()),
            "images": images.shape[0] * runtime.world,
        }

    try:
        last_val = train(
            TrainJob(
                stage_dir=stage.path,
                model=net,
                total_steps=cfg.steps,
                batches=step_loader(
                    ctx, dataset, cfg.batch_size, config.seed, cfg.steps, labeled_index_map(ctx, cfg, config.seed)
                ),
                objective=objective,
                cfg=cfg,
                runtime=runtime,
                fingerprint=fingerprint,
                validate=make_validator(ctx),
                description="pretrain",
                stop_at=pause_at,
            )
        )
    except BaseException as exc:
        if runtime.is_main and not isinstance(exc, KeyboardInterrupt | Interrupted):
            stage.fail(f"{type(exc).__name__}: {exc}")
        raise
    if pause_at is not None and pause_at < cfg.steps:
        if runtime.is_main:
            stage.pause(pause_at, last_val)
        barrier()
        return last_val
    if runtime.is_main:
        save_model(stage.path / "model.safetensors", model, model_metadata(config, ctx, "pretrain"))
        atomic_write_json(stage.path / "metrics.json", last_val)
        stage.finish(["model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl"], last_val)
    barrier()  # a next stage in this process (``labelpipe run``) reads the model rank 0 has just written
    return last_val


def _select(config: RunConfig, run_dir: Path, runtime: Runtime, force: bool) -> dict:
    """``select``: one pretrain per candidate in ``RUN/select/NAME`` (each resumable on its own), the one with
    the highest validation mIoU at the decision step (the last validation, or the last at ``decide_at`` of the
    steps; ties: the first listed) trained to the end and copied into ``RUN/pretrain``, the choice recorded in
    ``RUN/select/selection.json``, and ``RUN/config.yaml`` written with the chosen settings, so that every
    later stage and command trains and evaluates what was chosen."""
    assert config.select is not None
    names = list(config.select.candidates)
    candidates = {name: config.candidate(name) for name in names}
    at = {name: config.select.decision_step(candidates[name].train) for name in names}
    scores: dict[str, float] = {}
    for name in names:
        if runtime.is_main:
            print(f"pretrain: select candidate {name}")
        pause = at[name] if at[name] < candidates[name].train.steps else None
        run_pretrain(candidates[name], run_dir / "select" / name, runtime, force, pause_at=pause)
        scores[name] = _validation_at(run_dir / "select" / name / "pretrain", at[name])
    chosen = max(names, key=lambda name: scores[name])  # max keeps the first of equals
    chosen_config = candidates[chosen]
    if at[chosen] < chosen_config.train.steps:
        if runtime.is_main:
            print(f"pretrain: {chosen} chosen at step {at[chosen]}; training it to the end")
        run_pretrain(chosen_config, run_dir / "select" / chosen, runtime)  # resumes the paused run
    record = {
        "chosen": chosen,
        "by": "mIoU of the pretrain's validation at the decision step (the protocol's val split)",
        "decide_at": config.select.decide_at,
        "step": at,
        "scores": scores,
        "candidates": config.candidate_fingerprints(),
    }
    if runtime.is_main:
        with run_lock(run_dir, "pretrain"):
            _install(run_dir / "select" / chosen / "pretrain", run_dir / "pretrain", force)
            write_config(open_context(chosen_config, run_dir, runtime))
            atomic_write_json(run_dir / SELECTION_FILE, record)
        table = ", ".join(f"{name} {100 * score:.1f} (step {at[name]})" for name, score in scores.items())
        print(f"pretrain: validation mIoU {table}; chosen: {chosen}")
    barrier()  # no rank goes on before the chosen model is in place
    return StageDir(run_dir / "pretrain").manifest().get("summary", {})


def _validation_at(stage: Path, step: int) -> float:
    """The validation mIoU a pretrain logged after ``step`` steps (``log.jsonl``; every rank reads it once
    rank 0 has written it)."""
    barrier()
    for line in reversed(read_log(stage / "log.jsonl", step)):
        record = json.loads(line)
        if record.get("step") == step and "val_miou" in record:
            return float(record["val_miou"])
    raise LabelpipeError(
        f"{stage / 'log.jsonl'}: no validation mIoU at step {step} to choose by; set train.val_every so that the "
        "pretrain validates there (or delete the candidate's folder to train it again)"
    )


def _install(candidate: Path, target: Path, force: bool) -> None:
    """Copy a candidate's finished pretrain into the run's ``pretrain/`` unless it is already there (``force``:
    always): into a temporary sibling, then renamed into place, so a killed copy leaves the old stage or none."""
    fingerprint = (StageDir(candidate).manifest() or {}).get("fingerprint")
    if not force and fingerprint is not None and StageDir(target).is_up_to_date(fingerprint):
        return
    staging = target.with_name(f".{target.name}.installing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(candidate, staging)
    json.loads((staging / "manifest.json").read_text())  # a readable manifest, or fail before replacing anything
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
