"""What a training stage sets up around the loop: step loaders, the validator, the module to train, and the
metadata a saved model carries. Shared by ``pretrain`` and ``selftrain``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from labelpipe.config import RunConfig, TrainConfig
from labelpipe.context import StageContext, class_presence, class_prior
from labelpipe.data.dataset import StepBatchSampler, collate
from labelpipe.data.repeat_factor import image_repeat_factors, repeat_indices
from labelpipe.errors import LabelpipeError
from labelpipe.inference.measure import measure
from labelpipe.losses.class_balance import class_balance_weights
from labelpipe.metrics import iou_per_class, mean_iou, pixel_accuracy
from labelpipe.runtime import Runtime, place, unwrap


def num_workers(config: RunConfig, device: torch.device) -> int:
    if config.train.num_workers is not None:
        return config.train.num_workers
    return 4 if device.type == "cuda" else 0


def step_loader(ctx: StageContext, dataset, batch_size: int, seed: int, total: int, index_map=None):
    """start step -> iterator of batches, rank-sharded, deterministic in (seed, step); ``index_map``: the
    positions an epoch permutes (:func:`labeled_index_map`), None for each item once."""
    rt = ctx.runtime
    if batch_size < rt.world:
        raise LabelpipeError(
            f"train.batch_size={batch_size} with {rt.world} processes: each process needs at least one image "
            f"per step; use a batch size of at least {rt.world} (a multiple of it splits evenly)"
        )

    def batches(start: int):
        sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total, rt.rank, rt.world, index_map)
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


def labeled_index_map(ctx: StageContext, cfg: TrainConfig, seed: int) -> np.ndarray | None:
    """The labeled split's epoch under repeat-factor sampling (``train.repeat_factor`` t > 0: each image
    ``max(1, sqrt(t / f_c))`` times for its rarest class ``c``, in expectation); None samples each image once."""
    if cfg.repeat_factor == 0.0:
        return None
    factors = image_repeat_factors(class_presence(ctx, ctx.roles["labeled"]), cfg.repeat_factor)
    index_map = repeat_indices(factors, seed)
    if ctx.runtime.is_main:
        print(
            f"repeat-factor sampling (t={cfg.repeat_factor}): {index_map.size} labeled positions an epoch for "
            f"{factors.size} images (largest factor {factors.max():.2f})"
        )
    return index_map


def supervised_class_weights(ctx: StageContext, cfg: TrainConfig, device: torch.device) -> torch.Tensor | None:
    """(C,) float32 weights of the supervised CE (``train.class_balance`` > 0), from the labeled split's class
    prior; None for plain CE."""
    if cfg.class_balance == 0.0:
        return None
    prior = class_prior(ctx, ctx.roles["labeled"])
    return torch.from_numpy(class_balance_weights(prior, cfg.class_balance)).to(device)


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

    With ``train.channels_last`` (the default) the weights go NHWC (``runtime.place``), under
    torchrun the model is wrapped in DDP, and with ``train.compile`` the whole (DDP) module is compiled,
    which lets DDP's optimizer split the graph at its gradient buckets.
    """
    place(model, rt.device, cfg.channels_last)
    model.representation.requires_grad_(uses_rep)
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
