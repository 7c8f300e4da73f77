"""Segmentation models: a torchvision backbone, a DeepLabv3+ decoder, main / aux / representation heads."""

from __future__ import annotations

from pathlib import Path

from labelpipe.models.backbones import BACKBONES, load_backbone_weights
from labelpipe.models.deeplab import DeepLabV3Plus, SegmentationOutput

__all__ = ["BACKBONES", "DeepLabV3Plus", "SegmentationOutput", "build_model"]


def build_model(
    num_classes: int,
    backbone: str = "resnet18",
    output_stride: int = 16,
    aspp_rates: tuple[int, ...] = (6, 12, 18),
    rep_dim: int = 256,
    backbone_weights: Path | None = None,
) -> DeepLabV3Plus:
    model = DeepLabV3Plus(num_classes, backbone, output_stride, tuple(aspp_rates), rep_dim=rep_dim)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, Path(backbone_weights))
    return model
