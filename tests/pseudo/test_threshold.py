import numpy as np
import pytest

from labelpipe.pseudo.threshold import threshold_pseudo_labels

LABEL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2], dtype=np.uint8)
CONF = np.array([1.0, 1.0, 1.0, 0.75, 0.625, 0.5, 0.875, 0.5, 0.25, 0.375], dtype=np.float16)


def test_keeps_strictly_above_tau_by_hand():
    labels = threshold_pseudo_labels(LABEL, CONF, 0.625)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 255, 255, 1, 255, 255, 255])
    assert labels.dtype == np.uint8


def test_tau_zero_keeps_everything_with_positive_conf_and_tau_one_nothing():
    np.testing.assert_array_equal(threshold_pseudo_labels(LABEL, CONF, 0.0), LABEL)
    assert np.all(threshold_pseudo_labels(LABEL, CONF, 1.0) == 255)


def test_tau_is_compared_in_full_precision_not_rounded_to_float16():
    conf = np.array([0.89990234375], dtype=np.float16)  # the float16 nearest to 0.9
    assert threshold_pseudo_labels(np.array([1], np.uint8), conf, 0.8999)[0] == 1
    assert threshold_pseudo_labels(np.array([1], np.uint8), conf, 0.89995)[0] == 255


def test_keeps_the_shape_of_two_dimensional_maps():
    labels = threshold_pseudo_labels(LABEL.reshape(2, 5), CONF.reshape(2, 5), 0.625)
    assert labels.shape == (2, 5)


def test_rejects_length_mismatch_and_nan_tau():
    with pytest.raises(ValueError, match="same number of pixels"):
        threshold_pseudo_labels(LABEL, CONF[:3], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        threshold_pseudo_labels(LABEL, CONF, float("nan"))
