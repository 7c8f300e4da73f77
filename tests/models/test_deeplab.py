"""The model: three heads at the documented shapes, every backbone, strides, weights loading errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from labelpipe.errors import LabelpipeError
from labelpipe.models import build_model


@pytest.mark.parametrize(
    ("backbone", "stride"),
    [
        ("resnet18", 16),
        ("resnet18", 8),
        ("resnet34", 16),
        ("resnet50", 16),
        ("mobilenet_v3_large", 16),
        ("efficientnet_lite0", 16),
    ],
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
    """A batch of one image (a last batch, one rank's share) trains: no BatchNorm error on the 1 x 1 image-pooling
    branch, a finite non-zero gradient in all three heads, and an SGD step that changes the weights (finite)."""
    torch.manual_seed(0)
    model = build_model(3, "resnet18", 16, (1, 2, 3), rep_dim=8).train()
    x, y = torch.randn(1, 3, 32, 32), torch.randint(0, 3, (1, 32, 32))

    def loss_of() -> torch.Tensor:
        out = model(x)
        ce = torch.nn.functional.cross_entropy
        return ce(out.main, y) + 0.4 * ce(out.aux, y) + out.rep.pow(2).mean()

    loss = loss_of()
    loss.backward()
    assert torch.isfinite(loss)
    for head in (model.classifier, model.aux_classifier, model.representation):
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    before = model.classifier.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert not torch.equal(model.classifier.weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(loss_of())


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


def test_forward_without_the_representation_head_is_the_same_prediction():
    torch.manual_seed(0)
    model = build_model(5, "resnet18", 16, (1, 2, 3), 32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, lean = model(x), model(x, with_rep=False)
    assert lean.rep is None and full.rep.shape == (2, 32, 16, 16)
    assert torch.equal(full.main, lean.main) and torch.equal(full.aux, lean.aux)


def test_calibrate_representation_sets_never_run_statistics_once():
    torch.manual_seed(0)
    model = build_model(5, "resnet18", 16, (1, 2, 3), 32).train()
    batches = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():  # training without a representation loss never runs the head
        model(batches[0], with_rep=False)
    norm = model.representation[0][1]
    assert int(norm.num_batches_tracked) == 0 and torch.all(norm.running_mean == 0)
    main_stats = model.fuse[0][1].running_mean.clone()
    assert model.calibrate_representation(iter(batches))
    assert model.training  # mode restored
    assert torch.equal(model.fuse[0][1].running_mean, main_stats)  # the rest of the network untouched
    # the running mean is the plain average of the three batches' means of the conv output
    model.eval()
    conv = model.representation[0][0]
    means = []
    with torch.no_grad():
        for x in batches:
            feats = model.backbone(x)
            low = model.reduce_low(feats["low"])
            high = torch.nn.functional.interpolate(model.aspp(feats["high"]), size=low.shape[-2:], mode="bilinear")
            means.append(conv(model.fuse(torch.cat([high, low], 1))).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(norm.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1
    assert not model.calibrate_representation(iter(batches))  # already calibrated: left alone


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_head_dropout_before_both_classifiers(backbone):
    """``set_head_dropout(p)``: dropout p before the main classifier (a hand-written reference) and in the
    auxiliary head, in training only; the default main path has none; the weights do not change."""
    model = build_model(5, backbone, 16, (1, 2, 3), rep_dim=16)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    decoded = torch.randn(2, model.classifier.in_channels, 8, 8)
    model.train()
    state = torch.get_rng_state()
    assert torch.equal(model.classify(decoded), model.classifier(decoded))  # the default: no dropout there,
    assert torch.equal(torch.get_rng_state(), state)  # and no random number drawn
    model.eval()
    before = model(x)

    model.set_head_dropout(0.5)
    assert list(model.state_dict()) == keys
    assert [m.p for m in model.aux_classifier.modules() if isinstance(m, torch.nn.Dropout)] == [0.5]
    after = model(x)  # eval: dropout off, the same logits
    assert torch.equal(after.main, before.main) and torch.equal(after.aux, before.aux)

    model.train()
    torch.manual_seed(3)
    got = model.classify(decoded)
    torch.manual_seed(3)
    reference = model.classifier(torch.nn.functional.dropout(decoded, 0.5, True))
    assert torch.equal(got, reference)
    assert not torch.allclose(got, model.classifier(decoded))
    torch.manual_seed(4)
    a = model(x).main
    torch.manual_seed(5)
    assert not torch.equal(model(x).main, a)  # the main head now draws its own mask

    with pytest.raises(ValueError, match="must be in"):
        model.set_head_dropout(1.0)
