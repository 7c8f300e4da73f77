"""Model inference on whole images: batched, sliding-window where an image exceeds the crop.

Here :func:`predict_logits`; in the modules: ``loop`` (batches of a data set's images), ``measure``
(evaluation), ``predictions`` (a run's model into a prediction store: ``predict`` and self-training's
rounds) and ``segmenter`` (models and the loop of ``segment``).
"""

from __future__ import annotations

import math

import torch

from labelpipe.models import SegmentationOutput
from labelpipe.runtime import autocast


def _windows(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, crop: int, amp: bool = False, overlap: float = 1 / 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(main, aux) float32 logits (B, C, H, W) for normalised images (B, 3, H, W).

    Images no larger than ``crop`` go through in one pass; larger ones are tiled with windows of
    ``crop`` overlapping by ``overlap``, and logits are averaged where windows overlap.
    """
    b, _, h, w = images.shape
    if h <= crop and w <= crop:
        with autocast(images.device, amp):
            out: SegmentationOutput = model(images, with_rep=False)
        return out.main.float(), out.aux.float()
    stride = max(1, math.ceil(crop * (1 - overlap)))
    main = aux = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for top in _windows(h, crop, stride):
        for left in _windows(w, crop, stride):
            tile = images[:, :, top : top + crop, left : left + crop]
            with autocast(images.device, amp):
                out = model(tile, with_rep=False)
            if main is None:
                c = out.main.shape[1]
                main = torch.zeros(b, c, h, w, device=images.device)
                aux = torch.zeros(b, c, h, w, device=images.device)
            th, tw = tile.shape[-2:]
            main[:, :, top : top + th, left : left + tw] += out.main.float()
            aux[:, :, top : top + th, left : left + tw] += out.aux.float()
            count[:, :, top : top + th, left : left + tw] += 1
    return main / count, aux / count
