"""``labelpipe segment``: a trained (or exported) model on anyone's images -> masks, overlays, maps.

SOURCE arguments are image files, folders (searched recursively for PNG/JPEG) or globs. Every image
goes through :func:`labelpipe.inference.predict_logits`, the sliding-window inference ``evaluate``
uses: an image larger than the training crop is tiled with overlapping crop-sized windows. Per image
NAME (its path relative to the folder it was found in, or its file name) the output folder gets::

    NAME.png              class ids as a palette PNG (the data set's colours; 8-bit, pixel value = class id)
    NAME_overlay.jpg      the colours blended over the photo
    NAME_confidence.png   with --probabilities: max softmax probability, 8-bit grey (value / 255)
    NAME_entropy.png      with --probabilities: entropy / log(C), 8-bit grey (value / 255)
    segment.json          the model, classes, palette, and what was written or skipped

An image that cannot be read is named on stderr and skipped; the others are still written, and the
command exits non-zero at the end. Under ``--nproc``/torchrun each process segments every
``world``-th image (outputs are per image, so the processes never write the same file).

The models and the loop are :mod:`labelpipe.inference.segmenter` (the report draws its overlays with
them too); this verb collects the inputs and writes ``segment.json``.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from labelpipe.errors import LabelpipeError
from labelpipe.inference.segmenter import (
    InputImage,
    SegmentResult,
    load_file_segmenter,
    load_run_segmenter,
    segment_images,
)
from labelpipe.runtime import Runtime, barrier
from labelpipe.store.atomic import atomic_write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect_inputs(sources: list[str], exclude: Path | None = None) -> list[InputImage]:
    """The images named by files, folders (recursive) and globs, each once, with unique output names.

    A file is taken whatever its suffix (so a misnamed or broken file is reported, not silently
    dropped); folders and globs contribute their PNG/JPEG files. A source that names nothing is an error.
    Folders and globs skip what lies under ``exclude`` (the output folder: a second run over ``photos/``
    with ``--out photos/masks`` must not segment the first run's masks).
    """
    skip = exclude.resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        return _is_image(p) and (skip is None or not p.resolve().is_relative_to(skip))

    found: list[InputImage] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if wanted(p))
            if not files:
                raise LabelpipeError(f"{source}: folder has no PNG or JPEG images")
            found += [InputImage(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
        elif path.is_file():
            found.append(InputImage(path, path.stem))
        elif glob.has_magic(source):
            matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))]
            files = [p for p in matches if wanted(p)]
            for folder in (m for m in matches if m.is_dir()):
                files += sorted(p for p in folder.rglob("*") if wanted(p))
            if not files:
                raise LabelpipeError(f"{source}: the pattern matches no PNG or JPEG image")
            found += [InputImage(p, p.stem) for p in files]
        else:
            raise LabelpipeError(f"{source}: no such file or folder; pass image files, folders or globs")
    unique: list[InputImage] = []
    seen_paths: set[Path] = set()
    taken: set[str] = set()
    for item in found:
        resolved = item.path.resolve()
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        name, n = item.name, 1
        while name in taken:  # photo.jpg from two folders: photo, photo-2
            n += 1
            name = f"{item.name}-{n}"
        taken.add(name)
        unique.append(InputImage(item.path, name))
    return unique


def run_segment(
    sources: list[str],
    out_dir: Path,
    runtime: Runtime,
    run_dir: Path | None = None,
    model_name: str | None = None,
    model_file: Path | None = None,
    batch_size: int = 8,
    probabilities: bool = False,
) -> SegmentResult:
    """Segment the images of ``sources`` into ``out_dir`` with a run's model or an exported file.

    Raises :class:`LabelpipeError` (after everything readable was written) when an image could not be read.
    """
    if batch_size < 1:
        raise LabelpipeError(f"--batch-size {batch_size}: must be at least 1")
    if model_file is None and run_dir is None:
        raise LabelpipeError("segment: pass --run RUN (a trained run) or --model-file FILE (an exported model)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LabelpipeError(f"--out {out_dir}: is a file; pass a folder")
    items = collect_inputs(sources, exclude=out_dir)
    if not items:
        raise LabelpipeError("segment: no images given; pass image files, folders or globs")
    if model_file is not None:
        segmenter = load_file_segmenter(Path(model_file), runtime.device, run_dir)
    else:
        segmenter = load_run_segmenter(Path(run_dir), model_name, runtime.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = segment_images(segmenter, items, out_dir, runtime, batch_size, probabilities)
    barrier()
    if not runtime.is_main:
        return result
    failed = {path for path, _ in result.failed}
    names = [it.name for it in items if str(it.path) not in failed]
    suffixes = ["", "_overlay"] + (["_confidence", "_entropy"] if probabilities else [])
    atomic_write_json(
        out_dir / "segment.json",
        {
            "model": segmenter.name,
            "run": str(run_dir) if run_dir is not None else None,
            "model_file": str(model_file) if model_file is not None else None,
            "classes": segmenter.classes,
            "palette": [list(c) for c in segmenter.palette],
            "crop": segmenter.crop,
            "files": {
                "mask": "NAME.png (palette PNG, pixel value = class id)",
                "overlay": "NAME_overlay.jpg",
                **(
                    {
                        "confidence": "NAME_confidence.png (max probability x 255)",
                        "entropy": "NAME_entropy.png (entropy / log C x 255)",
                    }
                    if probabilities
                    else {}
                ),
            },
            "images": {it.name: str(it.path) for it in items if str(it.path) not in failed},
            "outputs_per_image": suffixes,
            "failed": [{"image": p, "reason": r} for p, r in result.failed],
        },
    )
    print(f"segment: {len(names)} image(s) with {segmenter.name} -> {out_dir} (device {runtime.device})")
    if result.failed:
        for _, reason in result.failed:
            print(f"skipped: {reason}", file=sys.stderr, flush=True)
        raise LabelpipeError(
            f"{len(result.failed)} of {len(items)} image(s) could not be read and were skipped (listed above); "
            f"the other {len(names)} were written to {out_dir}"
        )
    return result
