"""Class-balanced supervised CE (train.class_balance): the weights' formula and their use in both the
pretraining loss and the self-training step's supervised term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelpipe.config import TrainConfig
from labelpipe.losses.class_balance import class_balance_weights


def test_weights_are_inverse_powers_of_the_prior_with_mean_one():
    prior = np.array([0.9, 0.08, 0.02])
    w = class_balance_weights(prior, 0.5)
    expected = prior**-0.5 / np.sum(prior**0.5)  # p^-1/2 / sum_k p_k^(1/2)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert float(np.sum(prior * w)) == pytest.approx(1.0, rel=1e-6)  # a pixel weighs 1 on average
    assert w[2] / w[0] == pytest.approx((0.9 / 0.02) ** 0.5, rel=1e-5)  # rarer class, larger weight
    np.testing.assert_allclose(class_balance_weights(prior, 0.0), np.ones(3), rtol=1e-6)  # plain CE
    full = class_balance_weights(prior, 1.0)
    np.testing.assert_allclose(prior * full, np.full(3, 1 / 3), rtol=1e-6)  # every class weighs the same
    # Unnormalised counts give the same weights; an absent class gets the largest present weight.
    np.testing.assert_allclose(class_balance_weights(prior * 1000, 0.5), w, rtol=1e-6)
    absent = class_balance_weights(np.array([0.9, 0.1, 0.0]), 0.5)
    assert absent[2] == absent[1] == absent.max() and np.all(np.isfinite(absent))


@pytest.mark.parametrize("prior, power", [([0.5, 0.5], 1.5), ([0.5, -0.1], 0.5), ([0.0, 0.0], 0.5), ([np.nan], 0.5)])
def test_bad_prior_or_power_is_an_error(prior, power):
    with pytest.raises(ValueError):
        class_balance_weights(np.array(prior), power)


def test_setting_is_validated_and_fingerprinted_only_when_set():
    assert "class_balance" not in TrainConfig().fingerprint_fields()  # old runs stay up to date
    assert TrainConfig(class_balance=0.5).fingerprint_fields()["class_balance"] == 0.5
    with pytest.raises(ValueError):
        TrainConfig(class_balance=2.0)


def test_the_steps_supervised_term_is_the_class_weighted_ce():
    """The step's supervised loss with weights equals weighted CE (main + 0.4 aux) computed by hand, and its
    gradient differs from the unweighted one's (at random initialisation every pixel's CE is ~log C, so
    the loss values nearly agree; the gradient weighs the classes differently)."""
    from labelpipe.models import build_model
    from labelpipe.training.selftrain_step import SelftrainStep
    from tests.training.test_terms import IGNORE, NUM_CLASSES, batch, tiny_config

    config = tiny_config(strong_aug=False, terms=["supervised"])
    m = config.model
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, m.backbone, m.output_stride, m.aspp_rates, m.rep_dim, None)
    model.eval()
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    labeled, unlabeled = batch()
    losses, grads = {}, {}
    for name, w in (("weighted", weights), ("plain", None)):
        step = SelftrainStep.build(
            config, model, model, NUM_CLASSES, IGNORE, torch.device("cpu"), total_steps=10, class_weights=w
        )
        model.zero_grad()
        losses[name] = step((labeled, unlabeled), 0)[0]
        losses[name].backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    out = model(labeled["image"], with_rep=False)
    mask = labeled["mask"]
    by_hand = F.cross_entropy(out.main, mask, weight=weights) + 0.4 * F.cross_entropy(out.aux, mask, weight=weights)
    assert torch.allclose(losses["weighted"], by_hand, atol=1e-5)
    assert (grads["weighted"] - grads["plain"]).norm() > 0.1 * grads["plain"].norm()
