"""A contact sheet of a split: images next to their palette-coloured masks, for a first look at data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from labelpipe.data.base import DatasetSource

IGNORE_COLOUR = (255, 255, 255)
# Mask values that are neither a class nor ignore cannot occur after read_mask's validation;
# magenta would flag them should a decoder let one through.
UNKNOWN_COLOUR = (255, 0, 255)


def colour_mask(mask: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB: the palette colour per class, white for ignore."""
    lookup = np.tile(np.array(UNKNOWN_COLOUR, np.uint8), (256, 1))
    lookup[: len(palette)] = np.array(palette, np.uint8).reshape(-1, 3)
    lookup[ignore_index] = IGNORE_COLOUR
    return lookup[mask]


def write_montage(source: DatasetSource, split: str, out_png: Path, n: int = 16, seed: int = 0) -> Path:
    """Write a grid PNG of ``n`` seeded-random samples of ``split``: each image, then its coloured mask.

    Samples without a mask show the image and an empty panel titled "no mask".
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    samples = source.split(split)
    rng = np.random.default_rng(seed)
    count = min(n, len(samples))
    chosen = sorted(rng.choice(len(samples), size=count, replace=False).tolist())
    pairs_per_row = max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / pairs_per_row)
    figure = Figure(figsize=(2 * pairs_per_row * 1.6, rows * 1.75), dpi=100)
    axes = figure.subplots(rows, 2 * pairs_per_row, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for slot, sample_index in enumerate(chosen):
        sample = samples[sample_index]
        image, mask = source.read_pair(sample)
        image_axis = axes[slot // pairs_per_row, 2 * (slot % pairs_per_row)]
        mask_axis = axes[slot // pairs_per_row, 2 * (slot % pairs_per_row) + 1]
        image_axis.imshow(image, interpolation="nearest")
        image_axis.set_title(sample.id, fontsize=7)
        if mask is None:
            mask_axis.set_title("no mask", fontsize=7)
        else:
            mask_axis.imshow(colour_mask(mask, source.palette, source.ignore_index), interpolation="nearest")
            present = [
                source.classes[c]
                for c in np.unique(mask)
                if c < source.num_classes and source.classes[c] != "background"
            ]
            mask_axis.set_title(", ".join(present[:3]) or "mask", fontsize=6)
    figure.suptitle(f"{source.name} / {split}: image | mask (white = ignore)", fontsize=9)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png
