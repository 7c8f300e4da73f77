"""Augmentation with ``torchvision.transforms.v2`` on ``tv_tensors`` (images and masks move together).

Every random choice is drawn from torch's RNG; :class:`SegmentationDataset` seeds it per sample,
so the augmentation of a sample is a function of (seed, step, position): identical after a
resume and across worker counts.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from labelpipe.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``, relative to the image's own size."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params: dict):
        return TF.resize(inpt, params["size"], antialias=True)


def weak_transform(crop_size: int, scale_range: tuple[float, float], hflip: bool) -> v2.Transform:
    """Random scale, crop (padded with 0 / ignore), optional flip."""
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def strong_photometric(strength: float = 1.0) -> v2.Transform:
    """Colour jitter, grayscale and blur on the image only (masks pass through unchanged)."""
    s = strength
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.5 * s, 0.5 * s, 0.5 * s, min(0.5, 0.25 * s))], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0 + s))], p=0.5),
        ]
    )


def labeled_photometric(strength: float) -> v2.Transform | None:
    """``train.photometric``'s augmentation of the labeled images: :func:`strong_photometric` at that
    strength, or None (off) at 0."""
    return strong_photometric(strength) if strength > 0 else None


def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> normalised float32."""
    image = TF.to_dtype(image, torch.float32, scale=True)
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_input`, to float in [0, 1] for plots."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(-1, 1, 1)
    return (image * std + mean).clamp(0, 1)
