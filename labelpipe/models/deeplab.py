"""DeepLabv3+ with the three heads labelpipe's losses need.

``forward`` returns a :class:`SegmentationOutput`:
- ``main`` (B, C, H, W) logits at the input size, from the decoder (the prediction);
- ``aux`` (B, C, H, W) logits at the input size, from the stride-16 backbone features: the
  second classifier whose disagreement with ``main`` is the prediction variance (seed 000);
- ``rep`` (B, D, H/4, W/4) representation for the contrastive loss (U2PL+).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from labelpipe.models.backbones import build_backbone


class SegmentationOutput(NamedTuple):
    main: torch.Tensor
    aux: torch.Tensor
    rep: torch.Tensor | None  # None when the forward was asked not to compute it


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, and image pooling branches."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates])
        # No BatchNorm on the pooled branch: a 1x1 map has one value per channel, which breaks
        # BN's training statistics at batch size 1.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class SegmentationModel(nn.Module):
    """What every labelpipe model has: ``backbone``, ``classifier``, ``aux_classifier``, ``representation``
    and a forward returning :class:`SegmentationOutput`."""

    backbone: nn.Module
    classifier: nn.Module
    aux_classifier: nn.Sequential
    representation: nn.Module
    # Dropout before the main classifier: none by default; set_head_dropout changes it (not in the weights).
    main_dropout: float = 0.0

    def classify(self, decoded: torch.Tensor) -> torch.Tensor:
        """The main classifier's logits at the decoder's resolution (through ``main_dropout`` in training)."""
        if self.main_dropout > 0:  # no op, and no random number drawn, at the default 0
            decoded = F.dropout(decoded, self.main_dropout, self.training)
        return self.classifier(decoded)

    def set_head_dropout(self, p: float) -> None:
        """Dropout ``p`` before both classifiers in training (the auxiliary head's own 0.1 replaced): seed
        000's "Ours + dropout 0.5", where the two heads disagree more on the pixels they get wrong, so
        the prediction variance that weights the rectified loss separates wrong labels from right ones
        better. Only the forward changes: the weights, eval mode and inference are the same."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"head dropout {p}: must be in [0, 1)")
        self.main_dropout = float(p)
        for module in self.aux_classifier.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(p)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, decoder and head parameters): the latter train at ``decoder_lr_mult`` x the LR."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]

    @torch.no_grad()
    def calibrate_representation(self, batches: Iterable[torch.Tensor]) -> bool:
        """Running BatchNorm statistics of the representation head, when it has never been run in training.

        Training without a representation loss skips the head, so its BatchNorm layers keep their initial
        statistics (mean 0, variance 1); an eval-mode forward (the EMA teacher's) would then see
        unnormalised features. This sets them to the plain average over ``batches`` (the rest of the
        network in eval mode, no dropout, no random numbers drawn). Returns whether it calibrated.
        """
        norms = [m for m in self.representation.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or any(int(m.num_batches_tracked) > 0 for m in norms):
            return False
        was_training = self.training
        self.eval()
        self.representation.train()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        for images in batches:
            self.forward(images)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        self.train(was_training)
        return True


class DeepLabV3Plus(SegmentationModel):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        output_stride: int = 16,
        aspp_rates: tuple[int, ...] = (6, 12, 18),
        decoder_channels: int = 256,
        rep_dim: int = 256,
        aux_level: str = "mid",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.aux_level = aux_level
        self.backbone = build_backbone(backbone, output_stride)
        ch = self.backbone.channels
        self.aspp = ASPP(ch["high"], decoder_channels, tuple(aspp_rates))
        self.reduce_low = conv_bn_relu(ch["low"], 48, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(decoder_channels + 48, decoder_channels),
            conv_bn_relu(decoder_channels, decoder_channels),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.aux_classifier = nn.Sequential(
            conv_bn_relu(ch[aux_level], 256), nn.Dropout(0.1), nn.Conv2d(256, num_classes, 1)
        )
        self.representation = nn.Sequential(conv_bn_relu(decoder_channels, 256), conv_bn_relu(256, rep_dim, 1))

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> SegmentationOutput:
        """Main and auxiliary logits at the input's size, and the representation at the decoder's stride.

        ``with_rep=False`` skips the representation head (a 3x3 and a 1x1 convolution on the stride-4
        decoder map, ~20 % of an inference forward): only the contrastive loss and denoising read it.
        """
        size = x.shape[-2:]
        feats = self.backbone(x)
        low = self.reduce_low(feats["low"])
        high = F.interpolate(self.aspp(feats["high"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        decoded = self.fuse(torch.cat([high, low], dim=1))
        main = F.interpolate(self.classify(decoded), size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(feats[self.aux_level]), size=size, mode="bilinear", align_corners=False)
        return SegmentationOutput(main=main, aux=aux, rep=self.representation(decoded) if with_rep else None)
