"""Cross-entropy, symmetric CE (log 0 clamped at -4) and the Eq. 14 weight, by hand and against loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from labelpipe.losses.sce import masked_ce, symmetric_ce, unsupervised_ce_weight


def loop_sce(logits, target, xi1, xi2, ignore_index=255):
    """Wang et al.'s definition written literally: RCE = -sum_c p_c * clamp(log onehot_c, min=-4)."""
    total, n = 0.0, 0
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore_index:
                    continue
                p = torch.softmax(logits[i, :, y, x].double(), 0)
                ce = -math.log(p[t])
                rce = 0.0
                for k in range(c):
                    log_onehot = 0.0 if k == t else -4.0  # log 0 clamped
                    rce -= float(p[k]) * log_onehot
                total += xi1 * ce + xi2 * rce
                n += 1
    return total / max(n, 1)


def test_sce_hand_value_two_classes():
    # p = (0.75, 0.25): CE = -log 0.75, RCE = -(0.25 * -4) = 1.0
    logits = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    expected = -math.log(0.75) + 0.1 * 1.0
    assert symmetric_ce(logits, target) == pytest.approx(expected, rel=1e-6)
    # reverse CE alone is 4 * (1 - p_y)
    assert symmetric_ce(logits, target, xi1=0.0, xi2=1.0) == pytest.approx(1.0, rel=1e-6)
    assert symmetric_ce(logits, torch.ones_like(target), xi1=0.0, xi2=1.0) == pytest.approx(3.0, rel=1e-6)


def test_sce_matches_loop_with_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g) * 3
    target = torch.randint(0, 5, (2, 3, 4), generator=g)
    target[0, 0, :2] = 255
    target[1, 2, 3] = 255
    for xi1, xi2 in [(1.0, 0.1), (1.0, 0.5), (0.0, 1.0)]:
        got = symmetric_ce(logits, target, xi1=xi1, xi2=xi2)
        assert float(got) == pytest.approx(loop_sce(logits, target, xi1, xi2), rel=1e-5)


def test_sce_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    loss = symmetric_ce(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sce_ignored_pixels_get_no_gradient():
    logits = torch.randn(1, 3, 1, 2, requires_grad=True)
    target = torch.tensor([[[1, 255]]])
    symmetric_ce(logits, target).backward()
    assert logits.grad[..., 1].abs().sum() == 0
    assert logits.grad[..., 0].abs().sum() > 0


def test_masked_ce_without_weight_equals_torch_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 3, generator=g)
    target = torch.randint(0, 4, (2, 3, 3), generator=g)
    target[0, 1] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(masked_ce(logits, target), expected, atol=1e-6)


def test_masked_ce_weight_divides_by_valid_count_not_weight_sum():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 2, 2, generator=g)
    target = torch.tensor([[[0, 1], [2, 255]]])
    weight = torch.tensor([[[0.5, 1.0], [0.0, 0.9]]])
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = (ce[0, 0, 0] * 0.5 + ce[0, 0, 1] * 1.0 + ce[0, 1, 0] * 0.0) / 3
    assert torch.allclose(masked_ce(logits, target, weight=weight), expected, atol=1e-6)


def test_unsupervised_weight_is_total_over_kept():
    target = torch.full((2, 2, 2), 255)
    target[0, 0, 0] = 1
    target[1, 1, 1] = 0
    target[1, 0, 1] = 3
    assert float(unsupervised_ce_weight(target)) == pytest.approx(8 / 3)
    assert float(unsupervised_ce_weight(target, eta=0.5)) == pytest.approx(4 / 3)


def test_unsupervised_weight_zero_when_nothing_kept():
    weight = unsupervised_ce_weight(torch.full((1, 4, 4), 255))
    assert float(weight) == 0.0
    assert torch.isfinite(weight)


def test_sce_weights_each_pixel_and_keeps_the_valid_count_mean():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0] = 255
    weight = torch.rand(2, 3, 5, generator=g)
    assert torch.allclose(symmetric_ce(logits, target, weight=torch.ones(2, 3, 5)), symmetric_ce(logits, target))
    valid = target != 255
    per_pixel = []
    for i, y, x in valid.nonzero().tolist():
        one = symmetric_ce(logits[i : i + 1, :, y : y + 1, x : x + 1], target[i : i + 1, y : y + 1, x : x + 1])
        per_pixel.append(weight[i, y, x] * one)
    expected = torch.stack(per_pixel).sum() / valid.sum()
    assert torch.allclose(symmetric_ce(logits, target, weight=weight), expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        symmetric_ce(logits, target, weight=weight[:, :2])
