"""What every data set adapter provides: class names, a palette, split lists and a mask decoder.

An adapter maps a data set's own tree (a generic folder, Cityscapes, VOC, ...) to
:class:`SampleRef` lists. Reading and validating pixels is shared (:func:`read_image`,
:func:`read_mask`), so every adapter gets the same clear errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from labelpipe.errors import LabelpipeError

IGNORE_INDEX = 255
PROTOCOL_ROLES = ("labeled", "unlabeled", "val", "test")


@dataclass(frozen=True)
class SampleRef:
    """One image of a split: a stable id, the image path and (where it exists) the mask path."""

    id: str
    image: Path
    mask: Path | None = None


@dataclass
class DatasetSource:
    """A data set as labelpipe sees it.

    ``splits`` maps a split name to its samples. ``protocols`` maps a protocol name to the four
    roles of :data:`PROTOCOL_ROLES` (each a split name). ``decode_mask`` turns the raw mask array
    as stored on disk into class ids (0..C-1, 255 ignore); the identity for the generic folder.
    """

    name: str
    root: Path
    classes: list[str]
    palette: list[tuple[int, int, int]]
    splits: dict[str, list[SampleRef]]
    protocols: dict[str, dict[str, str]]
    default_protocol: str
    ignore_index: int = IGNORE_INDEX
    decode_mask: Callable[[np.ndarray], np.ndarray] | None = None
    # Classes the evaluation also averages over separately, e.g. SYNTHIA's 13-class mean.
    class_subsets: dict[str, list[int]] = field(default_factory=dict)
    # Reads the raw mask array when PIL's default decoding loses information (SYNTHIA's 16-bit PNGs).
    read_raw_mask: Callable[[Path], np.ndarray] | None = None
    # What an adapter skipped while scanning the tree (one line each), for `labelpipe data check`.
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> list[SampleRef]:
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise LabelpipeError(
                f"{self.root}: no split named '{name}' (known: {known}); add splits/{name}.txt or pick another"
            )
        samples = self.splits[name]
        if not samples:
            raise LabelpipeError(f"{self.root}: split '{name}' is empty; list one image id per line")
        return samples

    def read_mask(self, path: Path) -> np.ndarray:
        """(H, W) uint8 class ids of a mask of this data set, decoded and validated."""
        return read_mask(path, self.num_classes, self.decode_mask, self.ignore_index, self.read_raw_mask)

    def read_image(self, sample: SampleRef) -> np.ndarray:
        """(H, W, 3) uint8 RGB of one sample (its mask unread)."""
        return read_image(sample.image)

    def read_pair(self, sample: SampleRef) -> tuple[np.ndarray, np.ndarray | None]:
        return read_pair(sample, self.num_classes, self.decode_mask, self.ignore_index, self.read_raw_mask)

    def protocol(self, name: str | None) -> dict[str, str]:
        name = name or self.default_protocol
        if name not in self.protocols:
            known = ", ".join(sorted(self.protocols)) or "none"
            raise LabelpipeError(f"{self.root}: unknown protocol '{name}' (known: {known}); use --protocol")
        return self.protocols[name]


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Raises a one-line :class:`LabelpipeError` naming the file."""
    if not path.is_file():
        raise LabelpipeError(f"{path}: image file is missing; restore it or remove its id from the split list")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise LabelpipeError(f"{path}: cannot read image ({exc}); replace the file or drop its id") from exc


def read_mask(
    path: Path,
    num_classes: int,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
    ignore_index: int = IGNORE_INDEX,
    read_raw: Callable[[Path], np.ndarray] | None = None,
) -> np.ndarray:
    """(H, W) uint8 class ids with ``ignore_index`` for ignored pixels, validated.

    Palettised PNGs are read as indices (never converted to RGB). ``decode`` maps raw values
    (e.g. Cityscapes labelIds) to class ids before validation.
    """
    if not path.is_file():
        raise LabelpipeError(f"{path}: mask file is missing; restore it or remove its id from the split list")
    try:
        if read_raw is not None:
            raw = read_raw(path)
        else:
            with Image.open(path) as im:
                raw = np.asarray(im)
    except LabelpipeError:
        raise
    except (OSError, ValueError) as exc:
        raise LabelpipeError(f"{path}: cannot read mask ({exc}); replace the file") from exc
    if decode is not None:
        try:
            mask = decode(raw)
        except LabelpipeError as exc:
            raise LabelpipeError(f"{path}: {exc}") from exc
    else:
        if raw.ndim != 2:
            raise LabelpipeError(f"{path}: mask has shape {raw.shape}; masks must be single-channel PNGs of class ids")
        mask = raw
    bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_index)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise LabelpipeError(
            f"{path}: mask values {shown} are >= the number of classes ({num_classes}) and not {ignore_index}; "
            f"fix the mask or the class list in dataset.yaml"
        )
    return mask.astype(np.uint8, copy=False)


def read_pair(
    sample: SampleRef, num_classes: int, decode=None, ignore_index: int = IGNORE_INDEX, read_raw=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image and mask of one sample, checked to have the same height and width."""
    image = read_image(sample.image)
    if sample.mask is None:
        return image, None
    mask = read_mask(sample.mask, num_classes, decode, ignore_index, read_raw)
    if mask.shape != image.shape[:2]:
        raise LabelpipeError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {sample.image.name} is "
            f"{image.shape[1]}x{image.shape[0]}; masks must match their image's size"
        )
    return image, mask


def confined_id(path: Path, number: int, text: str) -> str:
    """``text`` (a split list's entry) if it names something inside the data root, else a one-line error.

    Ids are relative names: an absolute path or a ``..`` component would make the loaders read files
    outside the data set, so both are refused (by ``data check`` and by every command that loads it).
    """
    posix = text.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in posix.split("/"):
        raise LabelpipeError(
            f"{path}: line {number}: '{text}' points outside the data root; ids are relative names inside it "
            "(no leading '/', no '..')"
        )
    return text


def read_split_file(path: Path) -> list[str]:
    """Ids of a split list: one a line, blank lines and ``#`` comments skipped; each confined to the root."""
    if not path.is_file():
        raise LabelpipeError(f"{path}: split list is missing; create it with one image id per line")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(confined_id(path, number, line))
    return ids


def preflight(samples: list[SampleRef], with_masks: bool = True) -> None:
    """Cheap checks of a whole split before hours of training: files exist, image and mask sizes agree.

    Reads only file headers (PIL opens lazily); pixel values are checked when masks are read.
    """
    for sample in samples:
        if not sample.image.is_file():
            raise LabelpipeError(
                f"{sample.image}: image file is missing; restore it or remove its id from the split list"
            )
        if not with_masks or sample.mask is None:
            continue
        if not sample.mask.is_file():
            raise LabelpipeError(
                f"{sample.mask}: mask file is missing; restore it or remove its id from the split list"
            )
        try:
            with Image.open(sample.image) as im:
                image_size = im.size
        except (OSError, ValueError) as exc:
            raise LabelpipeError(f"{sample.image}: cannot read image ({exc}); replace the file or drop its id") from exc
        try:
            with Image.open(sample.mask) as im:
                mask_size = im.size
        except (OSError, ValueError) as exc:
            raise LabelpipeError(f"{sample.mask}: cannot read mask ({exc}); replace the file") from exc
        if image_size != mask_size:
            raise LabelpipeError(
                f"{sample.mask}: mask is {mask_size[0]}x{mask_size[1]} but image {sample.image.name} is "
                f"{image_size[0]}x{image_size[1]}; masks must match their image's size"
            )
