"""Light FPN-style decoder and the CPU model scales (``model.scale``: n, s, m).

The DeepLabv3+ head spends most of a small model's compute in 256-channel convolutions (ASPP, the
decoder and the representation head) on the stride-4 map. The FPN decoder here adds the backbone's
four levels after a 1x1 projection to ``D`` channels (top-down, each upsampled to the next finer
level), then one 3x3 convolution at stride 4; the three heads stay what the methods need:

- ``main`` (B, C, H, W) logits at the input size, from the decoder;
- ``aux`` (B, C, H, W) logits at the input size, from the stride-16 backbone features (``mid``);
- ``rep`` (B, rep_dim, H/4, W/4) representation for the contrastive loss, ``rep_dim`` growing with
  the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labelpipe.models.backbones import build_backbone
from labelpipe.models.deeplab import SegmentationModel, SegmentationOutput, conv_bn_relu

# Coarsest first: the order of the top-down pathway.
FPN_LEVELS = ("high", "mid", "c3", "low")


@dataclass(frozen=True)
class ScaleSpec:
    """A model scale: the backbone and its output stride, the decoder width and the representation width."""

    backbone: str
    output_stride: int
    decoder_channels: int
    rep_dim: int
    lite_stages: int = 7  # EfficientNet-Lite0's stages kept (5: up to stride 16)


# Training speed on 64 x 64 crops, batch 16, CPU, relative to the demo's ResNet-18 OS16 DeepLabv3+
# (benchmarks/train_throughput.py, interleaved, 1 thread; BENCHMARKS.md): n 4-5x (Lite0's first five
# stages, the 1152-channel blocks left out), s ~3x, m ~2x. At 2 threads on a loaded machine n was only 2x.
SCALES: dict[str, ScaleSpec] = {
    "n": ScaleSpec("efficientnet_lite0", 16, 64, 64, lite_stages=5),
    "s": ScaleSpec("efficientnet_lite0", 32, 96, 128),
    "m": ScaleSpec("efficientnet_lite0", 16, 128, 256),
}


class FPNSegmenter(SegmentationModel):
    """A backbone with the light FPN decoder, auxiliary classifier and representation head."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        output_stride: int = 32,
        decoder_channels: int = 64,
        rep_dim: int = 64,
        lite_stages: int = 7,
        aux_level: str = "mid",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.aux_level = aux_level
        self.backbone = build_backbone(backbone, output_stride, lite_stages)
        channels = self.backbone.channels
        width = decoder_channels
        # A backbone that ends at the auxiliary level (5-stage Lite0) has no separate top level.
        self.levels = FPN_LEVELS[1:] if getattr(self.backbone, "stages", 7) == 5 else FPN_LEVELS
        self.laterals = nn.ModuleDict({level: conv_bn_relu(channels[level], width, 1) for level in self.levels})
        self.fuse = conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.aux_classifier = nn.Sequential(
            conv_bn_relu(channels[aux_level], width), nn.Dropout(0.1), nn.Conv2d(width, num_classes, 1)
        )
        self.representation = nn.Sequential(conv_bn_relu(width, width), conv_bn_relu(width, rep_dim, 1))

    def decode(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D, H/4, W/4): the top-down sum of the projected levels, through one 3x3 convolution."""
        top = None
        for level in self.levels:
            lateral = self.laterals[level](feats[level])
            if top is not None and top.shape[-2:] != lateral.shape[-2:]:
                top = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            top = lateral if top is None else top + lateral
        return self.fuse(top)

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> SegmentationOutput:
        """Main and auxiliary logits at the input's size, and the representation at stride 4 (None when
        ``with_rep=False``, as in :class:`DeepLabV3Plus`)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        decoded = self.decode(feats)
        main = F.interpolate(self.classify(decoded), size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(feats[self.aux_level]), size=size, mode="bilinear", align_corners=False)
        return SegmentationOutput(main=main, aux=aux, rep=self.representation(decoded) if with_rep else None)
