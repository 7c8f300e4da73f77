"""The labeled class prior of a pseudolabel run without a data set (``--prior FILE``, ``--prior-from
DIR``), and the class counting it shares with the labelling. numpy and PIL only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.dars import PIECE_PIXELS
from labelpipe.pseudo.validation import IGNORE_LABEL


def count_classes(values: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 counts of class ids < C in a flat integer array (255 and other ids ignored), a piece at a
    time: ``np.bincount`` of a whole chunk would make an 8-byte index copy of every pixel. uint8 labels
    are counted two at a time (:func:`_count_uint8`)."""
    if values.dtype == np.uint8 and values.flags.c_contiguous:
        return _count_uint8(values.reshape(-1))[:num_classes]
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, values.size, PIECE_PIXELS):
        counts += np.bincount(values[start : start + PIECE_PIXELS], minlength=num_classes)[:num_classes]
    return counts


def _count_uint8(values: np.ndarray) -> np.ndarray:
    """(256,) counts of every byte value of a flat uint8 array: the bytes read in pairs as uint16, whose
    65,536-bin counts fold back into the two bytes' values (one index conversion per two pixels:
    ~1.6x faster than counting bytes)."""
    pairs = values[: values.size - values.size % 2].view(np.uint16)
    by_pair = np.zeros(1 << 16, np.int64)
    for start in range(0, pairs.size, 4 * PIECE_PIXELS):
        by_pair += np.bincount(pairs[start : start + 4 * PIECE_PIXELS], minlength=1 << 16)
    grid = by_pair.reshape(256, 256)  # [high byte, low byte]: either byte order, both bytes count
    counts = grid.sum(0) + grid.sum(1)
    if values.size % 2:
        counts[values[-1]] += 1
    return counts


def read_prior(path: Path, classes: list[str]) -> np.ndarray:
    """A (C,) class prior from ``path``: ``.npy`` (C,) fractions or counts, or ``.json`` (a list, or a
    {class name: value} object covering every class). Normalised to sum 1."""
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                missing = [c for c in classes if c not in data]
                if missing:
                    raise LabelpipeError(f"--prior {path}: no value for class(es) {', '.join(missing[:5])}")
                data = [data[c] for c in classes]
            values = np.asarray(data, dtype=np.float64)
        else:
            raise LabelpipeError(f"--prior {path}: expected a .json or .npy file")
    except (OSError, ValueError) as exc:
        raise LabelpipeError(f"--prior {path}: cannot read a class prior ({exc})") from exc
    return _normalised_prior(np.asarray(values, dtype=np.float64).reshape(-1), len(classes), f"--prior {path}")


def prior_from_masks(mask_dir: Path, num_classes: int, ignore_index: int = IGNORE_LABEL) -> np.ndarray:
    """The class prior from every PNG mask under ``mask_dir`` (class ids per pixel, ``ignore_index``
    excluded; palette PNGs give their indices)."""
    from PIL import Image

    if not mask_dir.is_dir():
        raise LabelpipeError(f"--prior-from {mask_dir}: not a directory of masks")
    counts = np.zeros(num_classes, np.int64)
    files = sorted(mask_dir.rglob("*.png"))
    if not files:
        raise LabelpipeError(f"--prior-from {mask_dir}: no .png masks found")
    for path in files:
        with Image.open(path) as im:
            mask = np.asarray(im)
        if mask.ndim != 2:
            raise LabelpipeError(f"{path}: a mask must be single-channel class ids, got shape {mask.shape}")
        valid = mask[mask != ignore_index]
        if valid.size and int(valid.max()) >= num_classes:
            raise LabelpipeError(f"{path}: class id {int(valid.max())} but the store has {num_classes} classes")
        counts += count_classes(valid.ravel(), num_classes)
    return _normalised_prior(counts.astype(np.float64), num_classes, f"--prior-from {mask_dir}")


def _normalised_prior(values: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    if values.size != num_classes:
        raise LabelpipeError(f"{what}: {values.size} values but the store has {num_classes} classes")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise LabelpipeError(f"{what}: a prior needs finite, non-negative values with a positive sum")
    return values / values.sum()
