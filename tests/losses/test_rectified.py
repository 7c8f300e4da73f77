"""Rectified loss (seed 000): by hand, against a loop, its options, and gradients into both heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from labelpipe.losses.rectified import prediction_variance, rectified_loss


def kl(p, q):
    return sum(float(pi) * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def loop_rectified(main, aux, target, direction="main||aux", mean_over="valid", aux_weight=0.0):
    """The equation pixel by pixel: mean(exp(-var) CE) + mean(var), plus the aux-head term."""

    def one_head(self_logits, other_logits):
        b, c, h, w = self_logits.shape
        weighted, var_sum, n_valid, n_all = 0.0, 0.0, 0, 0
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    ps = torch.softmax(self_logits[i, :, y, x].double(), 0).tolist()
                    po = torch.softmax(other_logits[i, :, y, x].double(), 0).tolist()
                    var = kl(ps, po) if direction == "main||aux" else kl(po, ps)
                    t = int(target[i, y, x])
                    n_all += 1
                    if t == 255:
                        if mean_over == "all":
                            var_sum += var
                        continue
                    n_valid += 1
                    weighted += math.exp(-var) * -math.log(ps[t])
                    var_sum += var
        denominator = n_valid if mean_over == "valid" else n_all
        return (weighted + var_sum) / max(denominator, 1)

    loss = one_head(main, aux)
    if aux_weight:
        loss += aux_weight * one_head(aux, main)
    return loss


def random_inputs(seed=0, b=2, c=4, h=3, w=3):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(b, c, h, w, generator=g) * 2
    aux = torch.randn(b, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[0, 0] = 255
    return main, aux, target


def test_hand_value_one_pixel():
    # p_main = (0.75, 0.25), p_aux = (0.5, 0.5), y = 0
    main = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    aux = torch.zeros(1, 2, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    var = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = math.exp(-var) * -math.log(0.75) + var
    assert float(prediction_variance(main, aux)) == pytest.approx(var, rel=1e-5)
    assert float(rectified_loss(main, aux, target)) == pytest.approx(expected, rel=1e-5)
    # the other direction: KL(aux || main)
    var_rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected_rev = math.exp(-var_rev) * -math.log(0.75) + var_rev
    got_rev = rectified_loss(main, aux, target, kl_direction="aux||main")
    assert float(got_rev) == pytest.approx(expected_rev, rel=1e-5)


@pytest.mark.parametrize("direction", ["main||aux", "aux||main"])
@pytest.mark.parametrize("mean_over", ["valid", "all"])
@pytest.mark.parametrize("aux_weight", [0.0, 0.5])
def test_matches_loop(direction, mean_over, aux_weight):
    main, aux, target = random_inputs()
    got = rectified_loss(main, aux, target, kl_direction=direction, mean_over=mean_over, aux_weight=aux_weight)
    assert float(got) == pytest.approx(loop_rectified(main, aux, target, direction, mean_over, aux_weight), rel=1e-5)


def test_options_change_the_value():
    main, aux, target = random_inputs(seed=3)
    paper = float(rectified_loss(main, aux, target))
    assert float(rectified_loss(main, aux, target, kl_direction="aux||main")) != pytest.approx(paper)
    assert float(rectified_loss(main, aux, target, mean_over="all")) != pytest.approx(paper)
    assert float(rectified_loss(main, aux, target, aux_weight=0.5)) > paper


def test_authors_configuration_equals_their_formula():
    """KLDivLoss(log_softmax(a), softmax(b)) is KL(b || a); each head's CE uses the other head as b."""
    main, aux, target = random_inputs(seed=4)

    def authors_term(pred1, pred2):
        ce = F.cross_entropy(pred1, target, ignore_index=255, reduction="none")
        kl_map = F.kl_div(F.log_softmax(pred1, 1), F.softmax(pred2, 1), reduction="none").sum(1)
        return torch.mean(ce * torch.exp(-kl_map)) + torch.mean(kl_map)

    expected = authors_term(main, aux) + 0.5 * authors_term(aux, main)
    got = rectified_loss(main, aux, target, kl_direction="aux||main", mean_over="all", aux_weight=0.5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gradients_reach_both_heads():
    main, aux, target = random_inputs(seed=5)
    main.requires_grad_(True)
    aux.requires_grad_(True)
    rectified_loss(main, aux, target).backward()
    assert main.grad.abs().sum() > 0
    assert aux.grad.abs().sum() > 0


def test_identical_heads_give_plain_cross_entropy():
    main, _, target = random_inputs(seed=6)
    assert torch.allclose(prediction_variance(main, main), torch.zeros(2, 3, 3), atol=1e-6)
    expected = F.cross_entropy(main, target, ignore_index=255)
    assert torch.allclose(rectified_loss(main, main.clone(), target), expected, atol=1e-5)


def test_variance_is_nonnegative_and_matches_loop():
    main, aux, _ = random_inputs(seed=7)
    var = prediction_variance(main, aux)
    assert (var >= -1e-6).all()
    p = torch.softmax(main[1, :, 2, 1].double(), 0).tolist()
    q = torch.softmax(aux[1, :, 2, 1].double(), 0).tolist()
    assert float(var[1, 2, 1]) == pytest.approx(kl(p, q), rel=1e-5)


def test_aux_of_another_size_is_upsampled_bilinearly():
    main, _, target = random_inputs(seed=8, h=4, w=4)
    small_aux = torch.randn(2, 4, 2, 2)
    upsampled = F.interpolate(small_aux, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(rectified_loss(main, small_aux, target), rectified_loss(main, upsampled, target))


def test_unknown_option_is_rejected():
    main, aux, target = random_inputs()
    with pytest.raises(ValueError):
        rectified_loss(main, aux, target, kl_direction="sym")
    with pytest.raises(ValueError):
        rectified_loss(main, aux, target, mean_over="image")


# --- the authors' form: per-class weights re-estimated every step, align_corners=True upsampling --------------


def test_class_weight_multiplies_each_pixels_ce_by_the_weight_of_its_label():
    torch.manual_seed(3)
    main, aux = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :2] = 255
    weight = torch.tensor([7.0, 1.0, 2.5])
    got = rectified_loss(main, aux, target, kl_direction="aux||main", mean_over="all", class_weight=weight)
    # By hand: torch's weighted CE with reduction none is weight[y] * CE; the authors then take the mean.
    log_p = F.log_softmax(main, 1)
    var = (F.softmax(aux, 1) * (F.log_softmax(aux, 1) - log_p)).sum(1)
    ce = F.cross_entropy(main, target, weight=weight, ignore_index=255, reduction="none")
    assert torch.allclose(got, (torch.exp(-var) * ce).mean() + var.mean(), atol=1e-6)
    assert not torch.allclose(got, rectified_loss(main, aux, target, kl_direction="aux||main", mean_over="all"))


def test_align_corners_option_upsamples_lower_resolution_logits_the_authors_way():
    torch.manual_seed(4)
    main, aux = torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4)
    target = torch.randint(0, 3, (1, 9, 12))
    up = {k: F.interpolate(t, size=(9, 12), mode="bilinear", align_corners=True) for k, t in [("m", main), ("a", aux)]}
    expected = rectified_loss(up["m"], up["a"], target)
    assert torch.allclose(rectified_loss(main, aux, target, align_corners=True), expected, atol=1e-6)
    assert not torch.allclose(rectified_loss(main, aux, target, align_corners=False), expected, atol=1e-4)


def test_often_balance_follows_the_authors_update_step_by_step():
    from labelpipe.losses.rectified import OftenBalance

    balance = OftenBalance(num_classes=3, max_value=7.0, min_pixels=4)
    # Two images: class 0 has 10 pixels (>= 4 * 2), class 1 has 3 (rare), class 2 none (rare and absent).
    labels = torch.full((2, 4, 4), 255)
    labels.view(-1)[:10] = 0
    labels.view(-1)[10:13] = 1
    w1 = balance(labels)
    often1 = torch.tensor([1.0, 1.0, 0.9 * 1 + 0.1 * 7])  # updated, then used
    assert torch.allclose(w1, torch.tensor([1.0, 7.0, 7.0]) * often1)
    w2 = balance(labels)
    often2 = 0.9 * often1 + 0.1 * torch.tensor([1.0, 1.0, 7.0])
    assert torch.allclose(w2, torch.tensor([1.0, 7.0, 7.0]) * often2)
    restored = OftenBalance(num_classes=3, max_value=7.0, min_pixels=4)
    restored.load_state_dict(balance.state_dict())  # the checkpointed state weights the next step the same
    assert torch.equal(restored(labels), balance(labels))


def test_head_consistency_is_the_mean_kl_over_the_pixels_inside_the_crop():
    """MRNet's memory regularisation: the heads' KL averaged over the pixels not on crop padding, the mask
    nearest-resized from the image's size to the logits'."""
    import numpy as np

    from labelpipe.losses import head_consistency

    g = torch.Generator().manual_seed(3)
    main, aux = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    inside = torch.zeros(2, 8, 8, dtype=torch.bool)
    inside[0] = True
    inside[1, :4, :] = True  # image 1: its upper half (logit rows 0-1)
    p = np.exp(main.double().numpy()) / np.exp(main.double().numpy()).sum(1, keepdims=True)
    q = np.exp(aux.double().numpy()) / np.exp(aux.double().numpy()).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(1)  # (2, 4, 4)
    assert float(head_consistency(main, aux)) == pytest.approx(kl.mean(), rel=1e-5)
    expected = np.concatenate([kl[0].ravel(), kl[1, :2].ravel()]).mean()
    assert float(head_consistency(main, aux, inside)) == pytest.approx(expected, rel=1e-5)
    assert float(head_consistency(main, main.clone(), inside)) == pytest.approx(0.0, abs=1e-6)
