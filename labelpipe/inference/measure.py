"""Confusion matrix and calibration of a model over a list of samples, sharded over the ranks."""

from __future__ import annotations

import numpy as np
import torch

from labelpipe import plots
from labelpipe.context import StageContext
from labelpipe.data import SampleRef
from labelpipe.data.transforms import denormalize
from labelpipe.inference.loop import iterate_predictions
from labelpipe.metrics import CalibrationAccumulator, ConfusionMatrix
from labelpipe.runtime import Runtime, all_reduce_sum


def shard(samples: list[SampleRef], runtime: Runtime) -> list[SampleRef]:
    """This rank's samples: every ``world``-th from ``rank`` (a rank may get none)."""
    return samples[runtime.rank :: runtime.world]


def measure(
    ctx: StageContext, model: torch.nn.Module, samples: list[SampleRef], batch_size: int, num_samples: int = 0
) -> tuple[ConfusionMatrix, CalibrationAccumulator, list[list[np.ndarray]]]:
    """Confusion matrix and calibration over all ``samples``, plus sample rows of this rank's images.

    Under torchrun each rank predicts its :func:`shard` and the counts are summed over the ranks,
    so every rank returns the same matrix as one process would. All ranks must call it.
    """
    source, rt = ctx.source, ctx.runtime
    cm = ConfusionMatrix(source.num_classes, source.ignore_index, rt.device)
    cal = CalibrationAccumulator()
    rows: list[list[np.ndarray]] = []
    for batch in iterate_predictions(
        model,
        source,
        shard(samples, rt),
        rt.device,
        ctx.config.train.crop_size,
        batch_size,
        amp=ctx.config.train.amp,
        require_masks=True,
    ):
        for image, mask, main in zip(batch.images, batch.masks, batch.main, strict=False):
            prob = torch.softmax(main, 0)
            conf, pred = prob.max(0)
            cm.update(mask, pred)
            valid = mask != source.ignore_index
            cal.update(conf[valid], (pred == mask)[valid])
            if len(rows) < num_samples:
                rgb = (denormalize(image).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
                rows.append(
                    [
                        rgb,
                        plots.colorize(mask.cpu().numpy().astype(np.uint8), source.palette),
                        plots.colorize(pred.cpu().numpy().astype(np.uint8), source.palette),
                    ]
                )
    cm.all_reduce()
    if rt.distributed:  # one float64 all-reduce of the three bin arrays (counts < 2**53 stay exact)
        bins = torch.from_numpy(np.concatenate([cal.count, cal.conf_sum, cal.correct_sum]).astype(np.float64))
        total = all_reduce_sum(bins.to(rt.device)).cpu().numpy()
        cal.count[:], cal.conf_sum[:], cal.correct_sum[:] = np.split(total, 3)
    return cm, cal, rows
