"""Batched inference over a split, shared by validation, ``evaluate`` and ``predict``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from labelpipe.data import DatasetSource, SampleRef
from labelpipe.data.dataset import SegmentationDataset, collate
from labelpipe.inference import predict_logits


@dataclass
class InferenceBatch:
    ids: list[str]
    indices: list[int]
    images: list[torch.Tensor]  # normalised (3, H, W) each, on the device
    masks: list[torch.Tensor]  # (H, W) int64, 255 where unknown
    main: list[torch.Tensor]  # (C, H, W) float32 logits
    aux: list[torch.Tensor]


def iterate_predictions(
    model: torch.nn.Module,
    source: DatasetSource,
    samples: list[SampleRef],
    device: torch.device,
    crop: int,
    batch_size: int,
    amp: bool = False,
    require_masks: bool = False,
    num_workers: int = 0,
) -> Iterator[InferenceBatch]:
    dataset = SegmentationDataset(source, samples, require_masks=require_masks)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            ids, indices = batch["id"], batch["index"].tolist()
            if isinstance(batch["image"], torch.Tensor):
                images = batch["image"].to(device, non_blocking=True)
                main, aux = predict_logits(model, images, crop, amp)
                yield InferenceBatch(ids, indices, list(images), list(batch["mask"].to(device)), list(main), list(aux))
            else:  # mixed sizes: one image at a time
                for i, (image, mask) in enumerate(zip(batch["image"], batch["mask"], strict=False)):
                    image = image.to(device)[None]
                    main, aux = predict_logits(model, image, crop, amp)
                    yield InferenceBatch([ids[i]], [indices[i]], [image[0]], [mask.to(device)], [main[0]], [aux[0]])
    finally:
        model.train(was_training)
