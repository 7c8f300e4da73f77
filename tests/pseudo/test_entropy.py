import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labelpipe.pseudo.entropy import (
    alpha_schedule,
    entropy_pseudo_labels,
    entropy_threshold,
    entropy_threshold_from_histogram,
)
from labelpipe.pseudo.entropy_online import (
    classwise_entropy_split_torch,
    entropy_split_torch,
    entropy_threshold_torch,
)
from labelpipe.pseudo.histogram import Float16Histogram

from .synthetic import random_nonnegative_float16

LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2], dtype=np.uint8)
ENTROPY = np.array([0.25, 0.5, 0.125, 1.0, 0.75, 2.0, 0.0, 1.5, 0.375, 0.625], dtype=np.float16)


def test_hand_computed_gamma_labels_and_unreliable_mask():
    # alpha_t = 0.2, N = 10: k = floor(8) = 8, gamma = 9th smallest = 1.5; H = 2.0 and 1.5 are unreliable.
    gamma = entropy_threshold(ENTROPY, 0.2)
    assert gamma == 1.5
    labels, unreliable = entropy_pseudo_labels(LABEL, ENTROPY, gamma)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 0, 255, 1, 255, 1, 2])
    np.testing.assert_array_equal(np.flatnonzero(unreliable), [5, 7])


def test_alpha_t_zero_keeps_everything_and_one_keeps_nothing():
    assert entropy_threshold(ENTROPY, 0.0) == math.inf
    assert not entropy_pseudo_labels(LABEL, ENTROPY, math.inf)[1].any()
    gamma = entropy_threshold(ENTROPY, 1.0)
    assert gamma == 0.0
    assert entropy_pseudo_labels(LABEL, ENTROPY, gamma)[1].all()


def test_alpha_schedule_is_linear_decay():
    assert alpha_schedule(0.2, 0, 100) == 0.2
    assert alpha_schedule(0.2, 50, 100) == pytest.approx(0.1)
    assert alpha_schedule(0.2, 100, 100) == 0.0
    with pytest.raises(ValueError, match="t must be"):
        alpha_schedule(0.2, 101, 100)
    with pytest.raises(ValueError, match="t_total"):
        alpha_schedule(0.2, 0, 0)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="alpha_t"):
        entropy_threshold(ENTROPY, 1.5)
    with pytest.raises(ValueError, match="non-negative and not NaN"):
        entropy_threshold(np.array([0.5, np.nan], np.float16), 0.2)
    with pytest.raises(ValueError, match="same number of pixels"):
        entropy_pseudo_labels(LABEL, ENTROPY[:4], 1.0)


def test_tiny_negative_entropies_are_clamped_to_zero():
    values = np.array([-1e-7, 0.5, 1.0, 2.0], np.float16)
    assert entropy_threshold(values, 1.0) == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), alpha_t=st.floats(0.0, 1.0))
def test_histogram_gamma_equals_sorted_gamma(seed, n, alpha_t):
    entropy = random_nonnegative_float16(seed, n)
    hist = Float16Histogram(1)
    hist.update(np.zeros(n, np.uint8), entropy)
    assert entropy_threshold_from_histogram(hist, alpha_t) == entropy_threshold(entropy, alpha_t)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), alpha_t=st.floats(0.0, 1.0))
def test_unreliable_fraction_is_at_least_alpha_t(seed, n, alpha_t):
    entropy = random_nonnegative_float16(seed, n)
    _, unreliable = entropy_pseudo_labels(np.zeros(n, np.uint8), entropy, entropy_threshold(entropy, alpha_t))
    assert unreliable.sum() >= n - math.floor((1 - alpha_t) * n)  # ties at gamma only add unreliable ones
    distinct = np.unique(entropy)
    _, unreliable = entropy_pseudo_labels(
        np.zeros(distinct.size, np.uint8), distinct, entropy_threshold(distinct, alpha_t)
    )
    assert unreliable.sum() == distinct.size - math.floor((1 - alpha_t) * distinct.size)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), alpha_t=st.floats(0.0, 1.0), with_mask=st.booleans())
def test_torch_split_equals_numpy_split(seed, alpha_t, with_mask):
    entropy = random_nonnegative_float16(seed, 2 * 8 * 12).reshape(2, 8, 12)
    valid = np.random.default_rng(seed).random(entropy.shape) < 0.8 if with_mask else np.ones(entropy.shape, bool)
    reliable = entropy_split_torch(
        torch.from_numpy(entropy.astype(np.float32)), alpha_t, torch.from_numpy(valid) if with_mask else None
    )
    gamma = entropy_threshold(entropy[valid], alpha_t)
    assert (
        float(entropy_threshold_torch(torch.from_numpy(entropy.astype(np.float32)), alpha_t, torch.from_numpy(valid)))
        == gamma
    )
    expected = valid & ~entropy_pseudo_labels(np.zeros(entropy.shape, np.uint8), entropy, gamma)[1]
    assert reliable.dtype == torch.bool and reliable.shape == entropy.shape
    np.testing.assert_array_equal(reliable.numpy(), expected)


def test_torch_split_with_no_valid_pixel_is_all_unreliable():
    entropy = torch.rand(1, 4, 4)
    reliable = entropy_split_torch(entropy, 0.2, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert not reliable.any()


def test_torch_split_does_not_track_gradients():
    entropy = torch.rand(2, 4, 4, requires_grad=True)
    assert not entropy_split_torch(entropy, 0.2).requires_grad


def test_classwise_split_keeps_the_most_certain_of_each_class_by_hand():
    # LABEL / ENTROPY above, alpha_t 0.2. Class 0 (6 pixels): k = floor(4.8) = 4, gamma = 5th smallest of
    # (0.25, 0.5, 0.125, 1.0, 0.75, 2.0) = 1.0, so 1.0 and 2.0 are unreliable. Class 1 (0.0, 1.5, 0.375): k = 2,
    # gamma = 1.5: 1.5 unreliable. Class 2 (one pixel): k = 0, gamma = its own 0.625: unreliable. The batch
    # split instead drops 2.0 and 1.5 only (gamma 1.5, above), all of them class 0 and 1's.
    entropy = torch.from_numpy(ENTROPY.astype(np.float32)).reshape(1, 1, 10)
    predicted = torch.from_numpy(LABEL.astype(np.int64)).reshape(1, 1, 10)
    reliable = classwise_entropy_split_torch(entropy, predicted, 0.2)
    np.testing.assert_array_equal(reliable.reshape(-1).numpy(), [1, 1, 1, 0, 1, 0, 1, 0, 1, 0])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), alpha_t=st.floats(0.0, 1.0), with_mask=st.booleans())
def test_classwise_split_is_the_numpy_split_within_each_class(seed, alpha_t, with_mask):
    rng = np.random.default_rng(seed)
    entropy = random_nonnegative_float16(seed, 2 * 8 * 12).reshape(2, 8, 12)
    predicted = rng.choice(4, size=entropy.shape, p=[0.7, 0.2, 0.08, 0.02])
    valid = rng.random(entropy.shape) < 0.8 if with_mask else np.ones(entropy.shape, bool)
    reliable = classwise_entropy_split_torch(
        torch.from_numpy(entropy.astype(np.float32)),
        torch.from_numpy(predicted),
        alpha_t,
        torch.from_numpy(valid) if with_mask else None,
    ).numpy()
    expected = np.zeros(entropy.shape, bool)
    for c in range(4):
        in_class = valid & (predicted == c)
        if in_class.any():
            gamma = entropy_threshold(entropy[in_class], alpha_t)
            expected |= in_class & (entropy.astype(np.float32) < gamma)
    np.testing.assert_array_equal(reliable, expected)
    assert not (reliable & ~valid).any()
