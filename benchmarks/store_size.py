"""Bytes a pixel of ``predictions.h5`` for each compression, with and without top-k (ALGORITHMS.md section 1).

Synthetic predictions shaped like two data sets, written the way ``labelpipe predict`` writes them
(``pixel_columns`` -> ``PartWriter`` -> ``merge_parts``):

- Cityscapes: 19 classes, 1024 x 2048 images. DeepLab's logits live at 1/8 resolution and are upsampled
  bilinearly, so the logit field is smooth: random logits on a 16 x 32 grid, upsampled to 128 x 256, plus
  fine noise there, upsampled again to full size and sharpened until the head is confident (the script
  prints the mean confidence and the share of pixels above 0.9). The aux head is the main one plus a
  weaker smooth perturbation, so the variance column is small and realistic.
- DigitScapes: 11 classes, 64 x 64 images from a 4 x 4 logit grid (output stride 16), background-heavy.

Sizes are whole files (data, chunk indexes, groups, index and attributes) over the pixel count; "raw"
is the uncompressed payload (7 bytes a pixel for the default columns, + 3 bytes per top-k entry).

    python benchmarks/store_size.py                 # 3 Cityscapes-sized maps, 200 DigitScapes maps
    python benchmarks/store_size.py --cityscapes-maps 1 --digitscapes-maps 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelpipe.store.columns import columns_to_numpy, pixel_columns  # noqa: E402
from labelpipe.store.prediction_store import PartWriter, merge_parts  # noqa: E402

COMPRESSIONS = ("lzf", "gzip-1", "none")
TOPK = 3


def smooth_logits(
    gen: torch.Generator,
    classes: int,
    grid: tuple[int, int],
    mid: tuple[int, int],
    size: tuple[int, int],
    sharpen: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C, H, W) logits: a coarse random field, upsampled, plus fine noise, upsampled again, sharpened."""
    coarse = torch.randn(1, classes, *grid, generator=gen) * 3
    field = F.interpolate(coarse, size=mid, mode="bilinear", align_corners=False)
    field = field + 0.5 * torch.randn(1, classes, *mid, generator=gen)
    if bias is not None:
        field = field + bias[None, :, None, None]
    return sharpen * F.interpolate(field, size=size, mode="bilinear", align_corners=False)[0]


def make_maps(kind: str, n: int, seed: int) -> list[tuple[str, dict[str, np.ndarray]]]:
    """n images of (id, columns with top-k) for ``kind`` in {cityscapes, digitscapes}."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if kind == "cityscapes":
            main = smooth_logits(gen, 19, (16, 32), (128, 256), (1024, 2048), sharpen=5.0)
            aux = main + smooth_logits(gen, 19, (16, 32), (128, 256), (1024, 2048), sharpen=0.3)
            image_id = f"city{i % 3}/city{i % 3}_{i:06d}_000019"
        else:
            bias = torch.tensor([4.0] + [0.0] * 10)  # mostly background, as on DigitScapes
            main = smooth_logits(gen, 11, (4, 4), (16, 16), (64, 64), sharpen=3.0, bias=bias)
            aux = main + smooth_logits(gen, 11, (4, 4), (16, 16), (64, 64), sharpen=0.3)
            image_id = f"t{i:05d}"
        out.append((image_id, columns_to_numpy(pixel_columns(main, aux, 1.0, TOPK))))
    return out


def store_size(
    maps: list[tuple[str, dict[str, np.ndarray]]], compression: str, topk: bool, images_per_part: int
) -> tuple[float, float]:
    """(file bytes / pixel, seconds to write the parts and merge them)."""
    keep = ("label", "conf", "entropy", "variance") + (("topk_prob", "topk_class") if topk else ())
    pixels = sum(columns["label"].size for _, columns in maps)
    with tempfile.TemporaryDirectory() as tmp:
        parts, store = Path(tmp) / "parts", Path(tmp) / "predictions.h5"
        t0 = time.perf_counter()
        writer = PartWriter(parts, images_per_part=images_per_part, compression=compression)
        for image_id, columns in maps:
            writer.add(image_id, {k: columns[k] for k in keep})
        writer.close()
        merge_parts(
            sorted(parts.glob("part-*.h5")),
            store,
            [i for i, _ in maps],
            {"classes": ["c"] * 19, "columns": list(keep), "temperature": 1.0},
        )
        seconds = time.perf_counter() - t0
        return store.stat().st_size / pixels, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cityscapes-maps", type=int, default=3)
    parser.add_argument("--digitscapes-maps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = [("cityscapes", args.cityscapes_maps, 1), ("digitscapes", args.digitscapes_maps, 32)]
    print(
        f"{'data set':<12} {'maps':>5} {'mean conf':>9} {'conf>0.9':>8} {'top-k':>5} {'raw':>6} "
        + " ".join(f"{c:>14}" for c in COMPRESSIONS)
    )
    for kind, n, per_part in cases:
        if n == 0:
            continue
        maps = make_maps(kind, n, args.seed)
        conf = np.concatenate([c["conf"].ravel() for _, c in maps]).astype(np.float32)
        for topk in (False, True):
            raw = 7 + (3 * TOPK if topk else 0)
            cells = []
            for compression in COMPRESSIONS:
                size, seconds = store_size(maps, compression, topk, per_part)
                cells.append(f"{size:6.2f} B {seconds:5.1f}s")
            print(
                f"{kind:<12} {n:>5} {conf.mean():9.3f} {(conf > 0.9).mean():8.1%} {TOPK if topk else 0:>5} "
                f"{raw:>4} B " + " ".join(f"{c:>14}" for c in cells)
            )


if __name__ == "__main__":
    main()
