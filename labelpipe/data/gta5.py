"""GTA5 (Richter et al. 2016): 24,966 game frames labelled in Cityscapes labelIds.

::

    ROOT/images/<id>.png
    ROOT/labels/<id>.png          palettised PNG whose indices are Cityscapes labelIds
    ROOT/splits/{train,val}.txt   optional user lists (see labelpipe.data.split_lists)

A few published frames have no label or a label of another size than the image. Such pairs are
skipped and counted: :func:`scan_gta5` returns the good pairs and one line per problem, and the
source :func:`load_gta5` returns holds only good pairs, with the problems on ``source.problems``.
Sizes come from the PNG headers (``Image.open(...).size`` reads no pixels), so the scan is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from labelpipe.data.base import IGNORE_INDEX, DatasetSource, SampleRef
from labelpipe.data.cityscapes import CLASSES, PALETTE, decode_label_ids
from labelpipe.data.split_lists import load_user_splits
from labelpipe.errors import LabelpipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ScannedSource(DatasetSource):
    """A :class:`DatasetSource` built from a scan of image/label pairs; ``problems`` lists the skipped ones."""

    @property
    def skipped(self) -> int:
        return len(self.problems)


@dataclass(frozen=True)
class PairScan:
    """The usable (image, label) pairs of a flat tree, the skipped ones, and one line per skip."""

    good: list[SampleRef]
    skipped: list[SampleRef]
    problems: list[str]


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    # One directory listing instead of a stat per id.
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in suffixes and stem not in found:
                found[stem] = entry.name
    return found


def _header_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the file header, or why it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__


def scan_pairs(image_dir: Path, label_dir: Path, label_suffixes: tuple[str, ...] = (".png",)) -> PairScan:
    """Pairs ``image_dir/<id>.*`` with ``label_dir/<id>.*``; skips missing, unreadable and mismatched ones.

    Ids are the file stems, sorted. A label without an image is reported too (it is not a sample).
    """
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise LabelpipeError(f"{folder}: folder is missing; the tree needs {image_dir.name}/ and {label_dir.name}/")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    labels = _files_by_stem(label_dir, label_suffixes)
    good: list[SampleRef] = []
    skipped: list[SampleRef] = []
    problems: list[str] = []

    def skip(sample: SampleRef, problem: str) -> None:
        skipped.append(sample)
        problems.append(problem)

    for sample_id in sorted(images.keys() | labels.keys()):
        label = label_dir / labels[sample_id] if sample_id in labels else None
        if sample_id not in images:
            # Not a sample without its image; listed under skipped so user split lists still resolve it.
            skip(
                SampleRef(sample_id, image_dir / f"{sample_id}.png", label),
                f"{label}: label has no image in {image_dir.name}/; skipped",
            )
            continue
        sample = SampleRef(id=sample_id, image=image_dir / images[sample_id], mask=label)
        if label is None:
            skip(sample, f"{sample.image}: image has no label in {label_dir.name}/; skipped")
            continue
        image_size = _header_size(sample.image)
        if isinstance(image_size, str):
            skip(sample, f"{sample.image}: cannot read image header ({image_size}); skipped")
            continue
        label_size = _header_size(label)
        if isinstance(label_size, str):
            skip(sample, f"{label}: cannot read label header ({label_size}); skipped")
            continue
        if image_size != label_size:
            skip(
                sample,
                f"{label}: label is {label_size[0]}x{label_size[1]} but image {sample.image.name} is "
                f"{image_size[0]}x{image_size[1]}; skipped",
            )
            continue
        good.append(sample)
    return PairScan(good, skipped, problems)


def scan_gta5(root: Path) -> PairScan:
    """The good (image, label) pairs of a GTA5 tree and one line per skipped pair."""
    root = Path(root)
    return scan_pairs(root / "images", root / "labels")


def load_gta5(root: Path) -> ScannedSource:
    """GTA5 at ``root`` as a labeled source domain for Cityscapes (the same 19 classes and ids).

    Split ``all`` (every good pair) plus the user's lists under ``root/splits/`` (entries naming a
    skipped pair are dropped; they are already in ``problems``). Protocol ``source``: labeled =
    ``train`` when the user gives one, else ``all``; val/test = ``val`` when given, else the labeled
    split (a check of source fit only: domain adaptation evaluates on the target, e.g. Cityscapes val).
    """
    root = Path(root)
    scan = scan_gta5(root)
    splits, protocols = pair_splits(root, scan, "GTA5 images and labels archives")
    return ScannedSource(
        name="gta5",
        root=root,
        classes=list(CLASSES),
        palette=list(PALETTE),
        splits=splits,
        protocols=protocols,
        default_protocol="source",
        ignore_index=IGNORE_INDEX,
        decode_mask=decode_label_ids,
        problems=list(scan.problems),
    )


def pair_splits(
    root: Path, scan: PairScan, archives: str
) -> tuple[dict[str, list[SampleRef]], dict[str, dict[str, str]]]:
    """Splits (``all`` + user lists, skipped pairs dropped) and protocols (``source`` + user ones)."""
    if not scan.good:
        raise LabelpipeError(
            f"{root}: no image has a label of the same size ({len(scan.problems)} skipped); unpack the {archives} here"
        )
    splits: dict[str, list[SampleRef]] = {"all": list(scan.good)}
    user_splits, user_protocols = load_user_splits(
        root,
        scan.good + scan.skipped,
        pool="all",
        val="all",
        builtin=splits,
        skip_ids={sample.id for sample in scan.skipped},
    )
    splits.update(user_splits)
    return splits, {"source": source_protocol(splits), **user_protocols}


def source_protocol(splits: dict[str, list[SampleRef]]) -> dict[str, str]:
    """The protocol of a labeled source domain: train (or all) labeled; val (or the same) to check fit."""
    labeled = "train" if "train" in splits else "all"
    val = "val" if "val" in splits else labeled
    return {"labeled": labeled, "unlabeled": labeled, "val": val, "test": val}
