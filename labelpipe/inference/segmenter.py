"""A segmentation model on anyone's images: the models ``segment`` (and the report's overlays) run, and
the batched loop that writes a mask, an overlay and optional probability maps per image.

A :class:`Segmenter` is a run's trained model (:func:`load_run_segmenter`) or an exported file
(:func:`load_file_segmenter`: TorchScript or ONNX), with its classes, palette and sliding-window crop.
:func:`segment_images` decodes the images in loader workers, batches consecutive same-size ones and runs
:func:`labelpipe.inference.predict_logits` (tiled with overlapping crop-sized windows where an image is
larger than the crop); :func:`write_outputs` writes each image's files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from labelpipe.data.transforms import to_model_input
from labelpipe.errors import LabelpipeError
from labelpipe.inference import predict_logits
from labelpipe.models import SegmentationOutput
from labelpipe.plots import colorize
from labelpipe.runtime import Runtime, all_gather_objects, place
from labelpipe.store.atomic import temp_sibling

DEFAULT_CROP = 512
OVERLAY_ALPHA = 0.5  # weight of the class colours in the overlay


@dataclass(frozen=True)
class InputImage:
    """An image to segment and the output name (no suffix, may contain '/') its files get."""

    path: Path
    name: str


@dataclass
class Segmenter:
    """What segmenting needs: a module with the model interface ``predict_logits`` calls, and how to draw it."""

    name: str
    model: torch.nn.Module  # model(x (B, 3, H, W) normalised, with_rep=False) -> SegmentationOutput
    classes: list[str]
    palette: list[tuple[int, int, int]]
    crop: int  # sliding-window size (the training crop)
    amp: bool = False


@dataclass
class SegmentResult:
    out_dir: Path
    written: list[str] = field(default_factory=list)  # output names, in input order (this rank's on rank > 0)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason) over all ranks


# -- models ------------------------------------------------------------------------------------------------


class LogitsModule(torch.nn.Module):
    """An exported main head (images -> logits) behind the interface of labelpipe's models.

    ``predict_logits`` calls ``model(x, with_rep=False).main``/``.aux``; an exported file has the main
    head only, so ``aux`` is the same tensor (it is never used by ``segment``).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.module = module  # kept so that .to()/.eval() reach a TorchScript module

    def forward(self, x: torch.Tensor, with_rep: bool = False) -> SegmentationOutput:
        logits = self.fn(x)
        return SegmentationOutput(main=logits, aux=logits, rep=None)


def _run_config(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    from labelpipe.config import load_yaml

    return load_yaml(run_dir / "config.yaml")


def run_palette(run_dir: Path | None, num_classes: int) -> list[tuple[int, int, int]]:
    """The palette of the data set a run was trained on; distinct default colours when it is not at hand.

    The data set is opened only where it already exists (nothing is built or downloaded for colours).
    """
    from labelpipe.data.folder import default_palette

    raw = _run_config(run_dir).get("data")
    if raw is not None:
        from labelpipe.config import DataConfig
        from labelpipe.data import open_source

        try:
            data = DataConfig.model_validate(raw)
            root = data.resolved_root()
            if root.is_dir():
                source = open_source(root, data.kind)
                if source.num_classes == num_classes:
                    return [tuple(int(v) for v in c) for c in source.palette]
        except (LabelpipeError, OSError, ValueError):
            pass  # a moved or changed data set: fall back to the default colours
    return default_palette(num_classes)


def _crop_of(run_dir: Path | None, sidecar: dict[str, Any]) -> int:
    crop = _run_config(run_dir).get("train", {}).get("crop_size")
    if crop:
        return int(crop)
    shapes = sidecar.get("check", {}).get("sample_shapes")
    return int(shapes[0][-1]) if shapes else DEFAULT_CROP


def load_run_segmenter(run_dir: Path, model_name: str | None, device: torch.device) -> Segmenter:
    """A run's trained model (``pretrain``, ``round-K``; default the latest), from its weights file."""
    from labelpipe.context import load_run_model

    name, model, meta = load_run_model(run_dir, model_name)
    train = _run_config(run_dir).get("train", {})
    place(model, device, bool(train.get("channels_last", True))).eval()  # NHWC kernels, as in training
    classes = meta.get("classes") or [f"class-{i}" for i in range(meta["num_classes"])]
    amp = bool(train.get("amp", True)) and device.type == "cuda"
    return Segmenter(name, model, classes, run_palette(run_dir, len(classes)), _crop_of(run_dir, {}), amp)


def load_file_segmenter(path: Path, device: torch.device, run_dir: Path | None = None) -> Segmenter:
    """An exported model (``labelpipe export``: TorchScript ``.pt`` or ONNX ``.onnx``) as a :class:`Segmenter`.

    Classes come from the JSON ``export`` writes next to the file (or the run's model), the palette
    and crop from ``run_dir`` where given.
    """
    if not path.is_file():
        raise LabelpipeError(f"--model-file {path}: no such file; write one with `labelpipe export`")
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise LabelpipeError(f"--model-file {path}: ONNX models need onnxruntime; pip install onnxruntime") from exc
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LabelpipeError(f"--model-file {path}: onnxruntime cannot load it ({exc})") from exc
        input_name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            (logits,) = session.run(None, {input_name: x.detach().float().cpu().numpy()})
            return torch.from_numpy(logits).to(x.device)

        model = LogitsModule(run_onnx)
    elif suffix in (".pt", ".pth", ".torchscript"):
        try:
            scripted = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise LabelpipeError(f"--model-file {path}: not a TorchScript file ({exc}); export one") from exc
        scripted.eval()
        model = LogitsModule(scripted, scripted)
    else:
        raise LabelpipeError(f"--model-file {path}: unknown format; use a TorchScript .pt or an ONNX .onnx file")
    classes = sidecar.get("classes")
    if not classes and run_dir is not None and run_dir.is_dir():
        from labelpipe.context import load_run_model

        classes = load_run_model(run_dir, None)[2].get("classes")
    if not classes:  # nothing says: ask the model how many classes it has
        with torch.no_grad():
            c = model(torch.zeros(1, 3, 32, 32, device=device)).main.shape[1]
        classes = [f"class-{i}" for i in range(c)]
    return Segmenter(path.name, model, list(classes), run_palette(run_dir, len(classes)), _crop_of(run_dir, sidecar))


# -- the loop ----------------------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    """Decoded images (uint8 (3, H, W)) or the reason one could not be read; read in loader workers."""

    def __init__(self, items: list[InputImage]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.items[index].path
        try:
            rgb = read_photo(path)
        except Exception as exc:  # OSError, PIL's DecompressionBombError and friends: a bad file, not a bug here
            return index, None, f"{path}: cannot read image ({exc})"
        return index, torch.from_numpy(rgb).permute(2, 0, 1), None


def read_photo(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, turned upright by its EXIF orientation (as viewers show a phone photo), so
    that the mask and overlay line up with the photo on screen. Data set images are read by
    :func:`labelpipe.data.read_image`, which keeps the stored pixel grid (masks are drawn on it)."""
    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))  # a writable copy


def _batches(
    loader: Iterator[tuple[int, torch.Tensor | None, str | None]], batch_size: int, pixel_budget: int
) -> Iterator[tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]]:
    """Consecutive same-size images grouped up to ``batch_size`` images and ``pixel_budget`` pixels.

    Yields (indices, images, failures); an image larger than the budget goes alone (sliding window).
    """
    indices: list[int] = []
    images: list[torch.Tensor] = []
    failed: list[tuple[int, str]] = []
    for index, image, error in loader:
        if image is None:
            failed.append((index, error or "cannot read image"))
            continue
        if images and (
            image.shape != images[0].shape
            or len(images) >= batch_size
            or (len(images) + 1) * image.shape[1] * image.shape[2] > pixel_budget
        ):
            yield indices, images, failed
            indices, images, failed = [], [], []
        indices.append(index)
        images.append(image)
    if images or failed:
        yield indices, images, failed


def write_outputs(
    out_dir: Path,
    name: str,
    rgb: np.ndarray,
    prob: torch.Tensor,
    palette: list[tuple[int, int, int]],
    probabilities: bool,
) -> list[str]:
    """Write NAME.png, NAME_overlay.jpg (and the two maps) from ``prob`` (C, H, W) softmax; returns file names.

    rgb: (H, W, 3) uint8.
    """
    c = prob.shape[0]
    conf, pred_t = prob.max(0)
    pred = pred_t.to(torch.uint8).cpu().numpy()
    files: list[tuple[str, Image.Image, dict[str, Any]]] = []
    mask = Image.fromarray(pred, mode="P")
    flat = [v for rgb_c in palette[:c] for v in rgb_c]
    mask.putpalette(flat + [255] * (768 - len(flat)))
    files.append((f"{name}.png", mask, {"format": "PNG"}))
    colours = colorize(pred, palette).astype(np.float32)
    overlay = (OVERLAY_ALPHA * colours + (1 - OVERLAY_ALPHA) * rgb.astype(np.float32)).round().astype(np.uint8)
    files.append((f"{name}_overlay.jpg", Image.fromarray(overlay), {"format": "JPEG", "quality": 90}))
    if probabilities:
        entropy = -(prob * torch.log(prob.clamp_min(1e-12))).sum(0) / math.log(max(c, 2))
        for suffix, value in (("confidence", conf), ("entropy", entropy)):
            grey = (value.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            files.append((f"{name}_{suffix}.png", Image.fromarray(grey, mode="L"), {"format": "PNG"}))
    for file_name, image, options in files:
        # Written under a temporary name and renamed: a killed run leaves whole files or none. Not fsynced
        # (unlike a stage's artifacts): four fsyncs per image would dominate on many small photos, and
        # what a power cut loses, running the command again rewrites.
        final = out_dir / file_name
        tmp = temp_sibling(final)
        try:
            image.save(tmp, **options)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return [f for f, _, _ in files]


def segment_images(
    segmenter: Segmenter,
    items: list[InputImage],
    out_dir: Path,
    runtime: Runtime,
    batch_size: int = 8,
    probabilities: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment this rank's share of ``items`` into ``out_dir``; failures are gathered from every rank.

    With ``runtime.world > 1`` all ranks must call it (the failures are all-gathered). Batches hold
    consecutive same-size images, at most ``batch_size`` of them and ``batch_size`` crops' worth of
    pixels, so memory stays that of ``batch_size`` crop-sized images whatever the photo sizes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = runtime.device
    mine = items[runtime.rank :: runtime.world]
    if num_workers is None:
        num_workers = 2 if device.type == "cuda" and len(mine) > 1 else 0  # decode while the GPU works
    loader = torch.utils.data.DataLoader(_Images(mine), batch_size=None, shuffle=False, num_workers=num_workers)
    result = SegmentResult(out_dir)
    failed: list[tuple[str, str]] = []
    bar = Progress(
        TextColumn("[bold]segment"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not (progress and runtime.is_main),
    )
    segmenter.model.eval()
    with bar:
        task = bar.add_task("segment", total=len(mine), info="")
        for indices, images, bad in _batches(iter(loader), batch_size, batch_size * segmenter.crop**2):
            for index, reason in bad:
                failed.append((str(mine[index].path), reason))
            if images:
                rgb = torch.stack(images)
                x = to_model_input(rgb.to(device, non_blocking=True))
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                main, _ = predict_logits(segmenter.model, x, segmenter.crop, segmenter.amp)
                prob = torch.softmax(main, 1)
                for i, index in enumerate(indices):
                    item = mine[index]
                    (out_dir / item.name).parent.mkdir(parents=True, exist_ok=True)
                    image_rgb = rgb[i].permute(1, 2, 0).numpy()
                    write_outputs(out_dir, item.name, image_rgb, prob[i], segmenter.palette, probabilities)
                    result.written.append(item.name)
            bar.update(task, advance=len(images) + len(bad), info=f"{len(failed)} unreadable" if failed else "")
    # A collective only when this call is one (a caller on rank 0 alone, e.g. the report, passes world 1).
    result.failed = [f for share in all_gather_objects(failed) for f in share] if runtime.distributed else failed
    return result
