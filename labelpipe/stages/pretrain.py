"""``labelpipe pretrain``: supervised training on the labeled (or source) split.

Loss: CE on the main head + ``aux_weight`` x CE on the auxiliary head (ignore 255).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from labelpipe.config import RunConfig, TrainConfig
from labelpipe.data.base import preflight
from labelpipe.data.dataset import SegmentationDataset, StepBatchSampler, collate
from labelpipe.data.transforms import weak_transform
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.metrics import iou_per_class, mean_iou, pixel_accuracy
from labelpipe.runtime import Runtime, barrier, seed_everything, unwrap
from labelpipe.stages.common import StageContext, class_prior, model_from_config, open_context, write_config
from labelpipe.stages.evaluate import measure
from labelpipe.stages.training import TrainJob, train
from labelpipe.store.atomic import atomic_write_json, sha256_json
from labelpipe.store.checkpoint import save_model
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir


def num_workers(config: RunConfig, device: torch.device) -> int:
    if config.train.num_workers is not None:
        return config.train.num_workers
    return 4 if device.type == "cuda" else 0


def step_loader(ctx: StageContext, dataset, batch_size: int, seed: int, total: int):
    """start step -> iterator of batches, rank-sharded, deterministic in (seed, step)."""
    rt = ctx.runtime
    if batch_size < rt.world:
        raise LabelpipeError(
            f"train.batch_size={batch_size} with {rt.world} processes: each process needs at least one image "
            f"per step; use a batch size of at least {rt.world} (a multiple of it splits evenly)"
        )

    def batches(start: int):
        sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total, rt.rank, rt.world)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers(ctx.config, rt.device),
            pin_memory=rt.device.type == "cuda",
            generator=torch.Generator(),
        )  # keeps the global RNG (dropout) untouched
        return iter(loader)

    return batches


def make_validator(ctx: StageContext):
    cfg = ctx.config.train
    samples = ctx.source.split(ctx.roles["val"])
    if cfg.val_limit is not None:
        samples = samples[: cfg.val_limit]

    def validate(model: torch.nn.Module) -> dict[str, float]:
        module = unwrap(model)
        cm, cal, _ = measure(ctx, module, samples, ctx.config.evaluate.batch_size)
        conf = cm.numpy()
        return {"miou": mean_iou(iou_per_class(conf)), "pixel_accuracy": pixel_accuracy(conf), "ece": cal.ece()}

    return validate


def wrap_ddp(model: torch.nn.Module, rt: Runtime, sync_bn: bool = True) -> torch.nn.Module:
    """DDP under torchrun (``model`` itself otherwise); BatchNorm becomes SyncBatchNorm when asked, on CUDA.

    The BatchNorm layers are converted in place, so ``model`` stays the module to save. Every
    parameter that requires grad must take part in the loss (heads no loss reads are frozen by
    :func:`for_training`), so DDP need not search the graph for unused ones at every step.
    """
    if not rt.distributed:
        return model
    if sync_bn and rt.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and rt.is_main:
        # torch's SyncBatchNorm has no CPU kernel (DDP refuses it: "only work with GPU modules").
        print(
            f"note: train.sync_bn needs CUDA; on CPU each of the {rt.world} processes normalises its own "
            "share of the batch (plain BatchNorm)"
        )
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def for_training(model: torch.nn.Module, rt: Runtime, cfg: TrainConfig, uses_rep: bool) -> torch.nn.Module:
    """The module the training loop calls; ``model`` (moved to the device) stays the plain module to save.

    ``uses_rep``: whether a loss reads the representation head; when none does, the head is frozen
    (its forward is skipped, see ``DeepLabV3Plus.forward``), which keeps DDP's gradient buckets exact.

    On CUDA the weights go channels_last (convolutions run NHWC kernels; inputs follow the weights), under
    torchrun the model is wrapped in DDP, and with ``train.compile`` the whole (DDP) module is compiled,
    which lets DDP's optimizer split the graph at its gradient buckets.
    """
    model.to(rt.device)
    model.representation.requires_grad_(uses_rep)
    if rt.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, rt, cfg.sync_bn)
    if cfg.compile != "off":
        if cfg.compile_backend == "inductor":
            net = torch.compile(net, mode=cfg.compile)
        else:  # modes are inductor's
            net = torch.compile(net, backend=cfg.compile_backend)
    return net


def model_metadata(config: RunConfig, ctx: StageContext, stage: str) -> dict:
    return {
        "stage": stage,
        "num_classes": ctx.source.num_classes,
        "classes": ctx.source.classes,
        "model": config.model.model_dump(mode="json"),
        "seed": config.seed,
    }


def run_pretrain(config: RunConfig, run_dir: Path, runtime: Runtime, force: bool = False) -> dict:
    ctx = open_context(config, run_dir, runtime)
    with run_lock(run_dir, "pretrain", enabled=runtime.is_main):
        return _pretrain(ctx, run_dir, runtime, force)


def _pretrain(ctx: StageContext, run_dir: Path, runtime: Runtime, force: bool) -> dict:
    config = ctx.config  # with defaults that depend on the data resolved
    cfg = config.train
    labeled = ctx.roles["labeled"]
    samples = ctx.source.split(labeled)
    stage = StageDir(run_dir / "pretrain")
    inputs = {
        "seed": config.seed,
        "data": config.data.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "train": cfg.fingerprint_fields(),
        "split": labeled,
        "split_ids": ctx.split_ids_fingerprint(labeled),
    }
    fingerprint = sha256_json(inputs)
    if not force and stage.is_up_to_date(fingerprint):
        if runtime.is_main:
            print(f"pretrain: up to date ({stage.path}); use --force to redo")
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
    dataset = SegmentationDataset(ctx.source, samples, weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip))
    ignore = ctx.source.ignore_index

    def objective(batch: dict, step: int):
        images = batch["image"].to(runtime.device, non_blocking=True)
        masks = batch["mask"].to(runtime.device, non_blocking=True)
        out = net(images, with_rep=False)  # no loss reads the representation
        loss_main = F.cross_entropy(out.main.float(), masks, ignore_index=ignore)
        loss_aux = F.cross_entropy(out.aux.float(), masks, ignore_index=ignore)
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
                batches=step_loader(ctx, dataset, cfg.batch_size, config.seed, cfg.steps),
                objective=objective,
                cfg=cfg,
                runtime=runtime,
                fingerprint=fingerprint,
                validate=make_validator(ctx),
                description="pretrain",
            )
        )
    except BaseException as exc:
        if runtime.is_main and not isinstance(exc, KeyboardInterrupt | Interrupted):
            stage.fail(f"{type(exc).__name__}: {exc}")
        raise
    if runtime.is_main:
        save_model(stage.path / "model.safetensors", model, model_metadata(config, ctx, "pretrain"))
        atomic_write_json(stage.path / "metrics.json", last_val)
        stage.finish(["model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl"], last_val)
    barrier()  # a next stage in this process (``labelpipe run``) reads the model rank 0 has just written
    return last_val
