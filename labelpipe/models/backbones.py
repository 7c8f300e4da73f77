"""torchvision backbones returning the three feature maps DeepLabv3+ needs.

``low`` (stride 4) feeds the decoder's skip connection, ``mid`` (the layer3 / stride-16 stage,
dilated to stride 8 at output stride 8) the auxiliary classifier, ``high`` (stride 8 or 16,
dilated) the ASPP.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from labelpipe.errors import LabelpipeError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "mobilenet_v3_large")


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
        self.channels = {"low": 64 * expansion, "mid": 256 * expansion, "high": 512 * expansion}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        low = n.layer1(x)
        mid = n.layer3(n.layer2(low))
        high = n.layer4(mid)
        return {"low": low, "mid": mid, "high": high}


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large, dilated to output stride 16 by torchvision (``dilated=True``)."""

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        if output_stride != 16:
            raise LabelpipeError("mobilenet_v3_large supports output_stride 16 only; set model.output_stride=16")
        net = torchvision.models.mobilenet_v3_large(weights=None, dilated=True)
        self.net = net
        del net.classifier, net.avgpool
        self.channels = {"low": 24, "mid": 112, "high": 960}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.features
        low = features[:4](x)
        mid = features[4:13](low)
        high = features[13:](mid)
        return {"low": low, "mid": mid, "high": high}


def build_backbone(name: str, output_stride: int) -> nn.Module:
    if name in RESNETS:
        return ResNetBackbone(name, output_stride)
    if name == "mobilenet_v3_large":
        return MobileNetV3Backbone(output_stride)
    raise LabelpipeError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")


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
            f"pass the torchvision weights of model.backbone"
        )
    net.load_state_dict(state, strict=True)
