"""Class counting (kept / predicted / ground-truth counts of the report, the --prior-from prior)."""

from __future__ import annotations

import numpy as np
import pytest

from labelpipe.pseudo.prior import count_classes


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4097, 300_001])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint16])
def test_counts_equal_bincount_for_any_length_and_dtype(n, dtype):
    rng = np.random.default_rng(n)
    values = rng.choice([0, 1, 2, 5, 7, 9, 10, 200, 255], size=n).astype(dtype)
    expected = np.bincount(values.astype(np.int64), minlength=256)[:11]
    got = count_classes(values, 11)
    assert got.dtype == np.int64 and got.shape == (11,)
    np.testing.assert_array_equal(got, expected)


def test_a_strided_uint8_view_is_counted_too():
    values = np.arange(1000, dtype=np.uint8) % 13
    view = values[::3]  # not contiguous: the byte-pair path does not apply
    np.testing.assert_array_equal(count_classes(view, 13), np.bincount(view, minlength=13))
