"""Input checks shared by the pseudo-label generators: flatten, convert, and fail with a clear ValueError."""

from __future__ import annotations

import math

import numpy as np

IGNORE_LABEL = 255

# float16 bit patterns: 0x7C00 is +inf, 0x7C01..0x7FFF are NaN, 0x8000 is -0.0, above that negative values.
FLOAT16_POSITIVE_INFINITY_BITS = 0x7C00
FLOAT16_NEGATIVE_ZERO_BITS = 0x8000


def flat_labels(label: np.ndarray, name: str = "label") -> np.ndarray:
    """Return ``label`` as a flat (N,) unsigned-integer array (a view when possible)."""
    label = np.asarray(label)
    if label.dtype.kind not in "ui":
        raise ValueError(f"{name} must be an integer array (uint8 class ids), got dtype {label.dtype}")
    if label.dtype.kind == "i" and label.size and label.min() < 0:
        raise ValueError(f"{name} has negative class ids")
    return label.reshape(-1)


def flat_float16(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a flat (N,) float16 array; other float dtypes are rounded to float16,
    the precision of the prediction store, so that every code path sees the same numbers."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array (float16), got dtype {values.dtype}")
    return values.astype(np.float16, copy=False).reshape(-1)


def nonnegative_float16_bits(values: np.ndarray, name: str) -> np.ndarray:
    """Bit patterns (uint16) of non-negative float16 ``values``: monotone in the value, so they sort and
    bin like the values. -0.0 is mapped to +0.0; negative values and NaN raise ValueError."""
    bits = values.view(np.uint16)
    if bits.size and bits.max() > FLOAT16_POSITIVE_INFINITY_BITS:
        bad = bits > FLOAT16_POSITIVE_INFINITY_BITS
        if np.any(bits[bad] != FLOAT16_NEGATIVE_ZERO_BITS):
            raise ValueError(f"{name} must be non-negative and not NaN (found {int(bad.sum())} such values)")
        bits = np.where(bad, np.uint16(0), bits)
    return bits


def clamp_nonnegative(values: np.ndarray) -> np.ndarray:
    """Clamp a float16 array of a quantity that is >= 0 in exact arithmetic (entropy, KL) at 0:
    negative entries are rounding error. NaN is kept (and rejected by the histogram)."""
    # Checked on the bit patterns: a float16 min() is ~30x slower than a uint16 max().
    bits = values.view(np.uint16)
    if bits.size and bits.max() > FLOAT16_POSITIVE_INFINITY_BITS:  # negative values or NaN present
        return np.where((bits > FLOAT16_NEGATIVE_ZERO_BITS) & ~np.isnan(values), np.float16(0), values)
    return values


def same_length(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str) -> None:
    if first.shape[0] != second.shape[0]:
        raise ValueError(
            f"{first_name} and {second_name} must have the same number of pixels, "
            f"got {first.shape[0]} and {second.shape[0]}"
        )


def labels_below(label: np.ndarray, num_classes: int, name: str = "label") -> None:
    if label.size and int(label.max()) >= num_classes:
        raise ValueError(
            f"{name} holds class id {int(label.max())} but there are only {num_classes} classes "
            f"(ignored pixels, {IGNORE_LABEL}, are not valid predictions)"
        )


def labeling_ratio(alpha: float, name: str = "alpha") -> float:
    """Check a fraction in (0, 1]."""
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {alpha}")
    return alpha


def unit_fraction(value: float, name: str) -> float:
    """Check a fraction in [0, 1]."""
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def class_prior(prior: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """Check a (C,) class prior: finite, non-negative, summing to 1 within ``tolerance``."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or prior.size == 0:
        raise ValueError(f"prior must be a non-empty 1-D array (class fractions), got shape {prior.shape}")
    if not np.all(np.isfinite(prior)) or np.any(prior < 0):
        raise ValueError("prior must hold finite, non-negative class fractions")
    total = float(prior.sum())
    if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=tolerance):
        raise ValueError(f"prior must sum to 1 (labeled pixel fractions, 255 excluded), got sum {total:.8g}")
    return prior


def finite_number(value: float, name: str) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return value
