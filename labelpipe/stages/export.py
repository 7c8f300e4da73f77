"""``labelpipe export RUN --format {torchscript,onnx}``: a run's model as one deployable file.

Only the main head is exported: the file maps a normalised image batch (B, 3, H, W) float32 to
(B, C, H, W) logits at the input size (argmax over C is the prediction). Batch, height and width
are dynamic. Before the file is renamed into place it is loaded back and run on random samples
(torch.jit.load, or onnxruntime where installed) and compared with eager PyTorch; the largest
absolute difference is recorded in a JSON next to it, with the class names and the input
normalisation (ImageNet mean / std of RGB in [0, 1]).

    RUN/export/<model>.pt | <model>.onnx    the model
    RUN/export/<model>.json                 classes, normalisation, the check

The exporters and their checks are :mod:`labelpipe.models.export`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labelpipe.context import load_run_model, model_path
from labelpipe.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from labelpipe.errors import LabelpipeError
from labelpipe.models.export import MainHead, export_onnx, export_torchscript
from labelpipe.runtime import select_device
from labelpipe.store.atomic import atomic_path, atomic_write_json

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # CUDA convolutions may run in TF32
DEFAULT_SAMPLE_SIZE = 64


def sample_shapes(run_dir: Path, crop: int | None = None) -> list[tuple[int, int, int, int]]:
    """``crop`` (default: the run's training crop from config.yaml, else 64) and a smaller non-square batch of 2.

    The second shape proves the file is not frozen to the size it was exported at.
    """
    size = crop or DEFAULT_SAMPLE_SIZE
    config = run_dir / "config.yaml"
    if crop is None and config.is_file():
        from labelpipe.config import load_yaml

        size = int(load_yaml(config).get("train", {}).get("crop_size", size))
    small = max(32, size // 2)
    return [(1, 3, size, size), (2, 3, small, small + 16)]


def run_export(
    run_dir: Path,
    fmt: str,
    model_name: str | None,
    out: Path | None,
    device: torch.device | str = "cpu",
    crop: int | None = None,
) -> Path:
    """Export the main head of a run's model; returns the written file (a JSON sits next to it).

    ``crop``: the size of the check's first sample (default: the run's training crop).
    """
    if fmt not in FORMATS:
        raise LabelpipeError(f"--format {fmt}: unknown format; use {' or '.join(FORMATS)}")
    device = device if isinstance(device, torch.device) else select_device(device)
    name, model, meta = load_run_model(Path(run_dir), model_name)
    wrapper = MainHead(model).to(device).eval()
    out = Path(out) if out is not None else Path(run_dir) / "export" / f"{name}{FORMATS[fmt]}"
    shapes = sample_shapes(Path(run_dir), crop)
    tolerance = TOLERANCE[device.type]
    exporter = export_torchscript if fmt == "torchscript" else export_onnx
    with atomic_path(out) as tmp:  # checked on the temp file; a failed check leaves nothing behind
        diff, checked_with = exporter(wrapper, tmp, shapes, device)
        if diff is not None and diff > tolerance:
            raise LabelpipeError(
                f"{out}: exported model differs from PyTorch by {diff:.3g} "
                f"(> {tolerance:g}); not written; report this as a bug"
            )
    atomic_write_json(
        out.with_suffix(".json"),
        {
            "model": name,
            "format": fmt,
            "file": out.name,
            "source": str(model_path(Path(run_dir), name)),
            "architecture": meta["model"],
            "classes": meta.get("classes"),
            "num_classes": meta["num_classes"],
            "input": {
                "name": "image",
                "shape": ["batch", 3, "height", "width"],
                "dtype": "float32",
                "normalisation": "RGB scaled to [0, 1], then (x - mean) / std per channel",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "output": {
                "name": "logits",
                "shape": ["batch", "num_classes", "height", "width"],
                "meaning": "main-head logits at the input size; argmax over classes is the prediction",
            },
            "check": {
                "against": "eager PyTorch",
                "runtime": checked_with,
                "device": str(device),
                "sample_shapes": [list(s) for s in shapes],
                "max_abs_diff": diff,
                "tolerance": tolerance,
            },
        },
    )
    where = f"max |diff| {diff:.2g} vs PyTorch ({checked_with})" if diff is not None else "not run-checked"
    print(f"export: {fmt} of {name} -> {out} ({where})")
    return out
