"""``labelpipe data check``: one pass over a data set's splits, returning what is wrong with it.

Pure: reads files, prints nothing; the CLI renders the returned dict. Every problem is one line that
names the file. Each distinct sample is read once even when several splits share it (Cityscapes'
``train`` is both labeled and unlabeled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from labelpipe.data.base import DatasetSource, SampleRef
from labelpipe.data.registry import read_decoded_mask
from labelpipe.errors import LabelpipeError

# What PIL raises for broken, truncated or hostile files.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class _SampleResult:
    missing_image: bool = False
    missing_mask: bool = False
    unreadable: bool = False
    size_mismatch: bool = False
    bad_values: bool = False
    # Pixels per class id, with the ignore index in the last bin; None when the mask was not read.
    pixels: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _check_sample(source: DatasetSource, sample: SampleRef) -> _SampleResult:
    result = _SampleResult()
    image_size: tuple[int, int] | None = None
    if not sample.image.is_file():
        result.missing_image = True
        result.problems.append(f"{sample.image}: image file is missing (id {sample.id})")
    else:
        try:
            with Image.open(sample.image) as im:
                im.load()  # decode every pixel: a truncated file fails here, not in training
                image_size = im.size
        except _READ_ERRORS as exc:
            result.unreadable = True
            result.problems.append(f"{sample.image}: cannot read image ({_one_line(exc)})")
    if sample.mask is None:
        return result
    if not sample.mask.is_file():
        result.missing_mask = True
        result.problems.append(f"{sample.mask}: mask file is missing (id {sample.id})")
        return result
    try:
        mask = read_decoded_mask(source, sample.mask)
    except LabelpipeError as exc:
        message = str(exc)
        result.unreadable = True
        result.problems.append(message if message.startswith(str(sample.mask)) else f"{sample.mask}: {message}")
        return result
    except _READ_ERRORS as exc:
        result.unreadable = True
        result.problems.append(f"{sample.mask}: cannot read mask ({_one_line(exc)})")
        return result
    if mask.ndim != 2:
        result.bad_values = True
        result.problems.append(f"{sample.mask}: mask has shape {mask.shape}; masks must be single-channel class ids")
        return result
    if image_size is not None and (mask.shape[1], mask.shape[0]) != image_size:
        result.size_mismatch = True
        result.problems.append(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {sample.image.name} is "
            f"{image_size[0]}x{image_size[1]}"
        )
    num_classes, ignore = source.num_classes, source.ignore_index
    if mask.dtype == np.uint8:
        # bincount is linear; np.unique sorts (10x slower on a 2048x1024 Cityscapes mask).
        histogram = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(histogram)
        counts = histogram[values]
    else:
        values, counts = np.unique(mask, return_counts=True)
    pixels = np.zeros(num_classes + 1, dtype=np.int64)
    bad = []
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if 0 <= value < num_classes:
            pixels[value] += count
        elif value == ignore:
            pixels[num_classes] += count
        else:
            bad.append(value)
    result.pixels = pixels
    if bad:
        result.bad_values = True
        shown = ", ".join(str(v) for v in bad[:8])
        result.problems.append(
            f"{sample.mask}: mask values {shown} are neither a class id (0..{num_classes - 1}) nor {ignore}"
        )
    return result


_COUNTERS = ("missing_image", "missing_mask", "unreadable", "size_mismatch", "bad_values")
_SampleKey = tuple[str, Path, Path | None]  # (id, image, mask): a sample in several splits is read once


def _key(sample: SampleRef) -> _SampleKey:
    return (sample.id, sample.image, sample.mask)


def _check_distinct_samples(
    source: DatasetSource, names: list[str], progress: Callable[[int, int], None] | None
) -> dict[_SampleKey, _SampleResult]:
    """Check each distinct sample of the splits ``names`` once, in split order; ``progress(done, total)``."""
    distinct: dict[_SampleKey, SampleRef] = {}
    for name in names:
        for sample in source.splits[name]:
            distinct.setdefault(_key(sample), sample)
    results: dict[_SampleKey, _SampleResult] = {}
    for done, (key, sample) in enumerate(distinct.items(), start=1):
        results[key] = _check_sample(source, sample)
        if progress is not None:
            progress(done, len(distinct))
    return results


def _pixel_counts(source: DatasetSource, results: Iterable[_SampleResult]) -> dict[str, Any]:
    """``class_pixels`` ({class: pixels}) and ``ignored_pixels`` summed over the masks read in ``results``."""
    pixels = np.zeros(source.num_classes + 1, dtype=np.int64)
    for result in results:
        if result.pixels is not None:
            pixels += result.pixels
    return {
        "class_pixels": dict(zip(source.classes, pixels[: source.num_classes].tolist(), strict=True)),
        "ignored_pixels": int(pixels[source.num_classes]),
    }


def _split_report(
    source: DatasetSource, name: str, results: dict[_SampleKey, _SampleResult]
) -> tuple[dict[str, Any], list[str]]:
    """The report of split ``name`` from its samples' results, and the split's own problems (empty,
    ids listed more than once)."""
    samples = source.splits[name]
    problems = []
    if not samples:
        problems.append(f"{source.root}: split '{name}' is empty")
    ids = [sample.id for sample in samples]
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        problems.append(f"{source.root}: split '{name}' lists {duplicates} image ids more than once")
    mine = [results[_key(sample)] for sample in samples]
    counts = {counter: sum(int(getattr(result, counter)) for result in mine) for counter in _COUNTERS}
    report = {
        "images": len(samples),
        "masks": sum(sample.mask is not None for sample in samples),
        "missing_images": counts["missing_image"],
        "missing_masks": counts["missing_mask"],
        "unreadable": counts["unreadable"],
        "size_mismatches": counts["size_mismatch"],
        "bad_mask_values": counts["bad_values"],
        "duplicates": duplicates,
        **_pixel_counts(source, mine),
    }
    return report, problems


def check_dataset(
    source: DatasetSource,
    splits: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Check the given splits (default: all) of ``source`` in one pass.

    Returns a JSON-ready dict::

        dataset, root, classes, ignore_index
        splits: {NAME: {images, masks, missing_images, missing_masks, unreadable, size_mismatches,
                        bad_mask_values, duplicates, class_pixels: {class: n}, ignored_pixels}}
        class_pixels: {class: n}, ignored_pixels   over every distinct mask checked (decoded ids)
        problems: [one line each, naming the file]  (including what the adapter skipped while loading)
        ok: no problems

    ``progress(done, total)`` is called after each distinct sample (for a progress bar).
    Raises :class:`LabelpipeError` for a split name the source does not have.
    """
    names = list(source.splits) if splits is None else list(splits)
    for name in names:
        if name not in source.splits:
            source.split(name)  # raises the one-line "no split named ..." error
    results = _check_distinct_samples(source, names, progress)
    # Problems the adapter found while loading (GTA5 pairs it skipped, ...), then the files', then the splits'.
    problems: list[str] = list(getattr(source, "problems", []))
    problems += [line for result in results.values() for line in result.problems]
    split_reports: dict[str, dict[str, Any]] = {}
    for name in names:
        split_reports[name], split_problems = _split_report(source, name, results)
        problems += split_problems
    return {
        "dataset": source.name,
        "root": str(source.root),
        "classes": list(source.classes),
        "ignore_index": source.ignore_index,
        "splits": split_reports,
        **_pixel_counts(source, results.values()),
        "problems": problems,
        "ok": not problems,
    }
