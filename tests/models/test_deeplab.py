"""The model: three heads at the documented shapes, every backbone, strides, weights loading errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from labelpipe.errors import LabelpipeError
from labelpipe.models import build_model


@pytest.mark.parametrize(
    ("backbone", "stride"),
    [("resnet18", 16), ("resnet18", 8), ("resnet34", 16), ("resnet50", 16), ("mobilenet_v3_large", 16)],
)
def test_forward_returns_main_aux_and_representation(backbone, stride):
    model = build_model(7, backbone, stride, (1, 2, 3), rep_dim=32).eval()
    out = model(torch.randn(2, 3, 64, 48))
    assert out.main.shape == (2, 7, 64, 48)
    assert out.aux.shape == (2, 7, 64, 48)
    assert out.rep.shape == (2, 32, 16, 12)


@pytest.mark.parametrize(("stride", "expected"), [(16, 4), (8, 8)])
def test_output_stride_sets_the_high_level_resolution(stride, expected):
    model = build_model(3, "resnet18", stride, (1, 2, 3)).eval()
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert feats["high"].shape[-1] == expected
    # The auxiliary head reads layer3: stride 16, or 8 when layer3 is dilated too (OS 8).
    assert feats["mid"].shape[-1] == expected
    assert feats["low"].shape[-1] == 16


def test_batch_of_one_trains():
    model = build_model(3, "resnet18", 16, (1, 2, 3)).train()
    out = model(torch.randn(1, 3, 32, 32))
    (out.main.mean() + out.aux.mean() + out.rep.mean()).backward()


def test_parameter_groups_split_backbone_from_heads():
    model = build_model(5, "resnet18", 16)
    backbone, head = model.parameter_groups()
    assert {id(p) for p in backbone}.isdisjoint({id(p) for p in head})
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert any(p is model.classifier.weight for p in head)


def test_backbone_weights_load_from_a_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(5, "resnet18", 16, backbone_weights=path)
    assert torch.equal(model.backbone.net.conv1.weight, reference.conv1.weight)


def test_mismatched_backbone_weights_fail_with_the_file_named(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(LabelpipeError, match="resnet50.pth.*do not match"):
        build_model(5, "resnet18", 16, backbone_weights=path)


def test_missing_backbone_weights_file(tmp_path):
    with pytest.raises(LabelpipeError, match="not found"):
        build_model(5, "resnet18", 16, backbone_weights=tmp_path / "nope.pth")
