"""Which adapter reads a data set tree, detected from the tree when the user does not say.

Detection, first match wins: ``dataset.yaml`` -> folder; ``leftImg8bit/`` -> cityscapes;
``JPEGImages/`` -> voc; ``images/`` + ``labels/`` -> gta5; ``RGB/`` + ``GT/`` -> synthia.

Domain adaptation (GTA5 or SYNTHIA -> Cityscapes) needs the target next to the source: link it into
the source tree as ``ROOT/target`` (``ln -s /data/cityscapes /data/gta5/target``) or pass
``target_root``. The source then gains the target's splits as ``target/<split>`` and the protocol
``adapt``: labeled = the source's labeled split, unlabeled / val / test = the target's (from its
default protocol), with the target's masks mapped onto the source's classes by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from labelpipe.data.base import IGNORE_INDEX, DatasetSource
from labelpipe.data.cityscapes import load_cityscapes
from labelpipe.data.gta5 import ScannedSource, load_gta5
from labelpipe.data.synthia import load_synthia
from labelpipe.data.voc import load_voc
from labelpipe.errors import LabelpipeError


def _load_folder(root: Path) -> DatasetSource:
    # Imported here: the folder adapter pulls in pydantic models that the benchmark adapters do not need.
    from labelpipe.data.folder import load_folder_dataset

    return load_folder_dataset(root)


KINDS: dict[str, Callable[[Path], DatasetSource]] = {
    "folder": _load_folder,
    "cityscapes": load_cityscapes,
    "voc": load_voc,
    "gta5": load_gta5,
    "synthia": load_synthia,
}

TARGET_LINK = "target"
ADAPTATION_SOURCES = ("gta5", "synthia")  # kinds whose ROOT/target link is picked up
ADAPT_PROTOCOL = "adapt"


def detect_kind(root: Path) -> str | None:
    """The kind of data set tree at ``root``, or None when no layout matches."""
    root = Path(root)
    if (root / "dataset.yaml").is_file():
        return "folder"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "JPEGImages").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "gta5"
    if (root / "RGB").is_dir() and (root / "GT").is_dir():
        return "synthia"
    return None


def _unknown_tree_message(root: Path) -> str:
    # A common slip is pointing one level too high (VOCdevkit/ instead of VOCdevkit/VOC2012/).
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        kind = detect_kind(child)
        if kind is not None:
            return f"{root}: not a data set tree, but {child} looks like {kind}; point at that folder instead"
    return (
        f"{root}: unknown data set layout (no dataset.yaml, leftImg8bit/, JPEGImages/, images/+labels/ "
        f"or RGB/+GT/); point at the data set's top folder or pass --kind {{{', '.join(KINDS)}}}"
    )


def open_dataset(root: Path, kind: str | None = None, target_root: Path | None = None) -> DatasetSource:
    """The data set at ``root`` as a :class:`DatasetSource`; ``kind`` is detected when None.

    ``target_root`` (default for gta5 / synthia: ``root/target`` when it exists) adds a
    domain-adaptation target, see :func:`with_target`. Raises a one-line :class:`LabelpipeError`
    naming the root and the fix.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise LabelpipeError(f"{root}: data set folder {what}; check the path (--root / data.root)")
    if kind is None:
        kind = detect_kind(root)
        if kind is None:
            raise LabelpipeError(_unknown_tree_message(root))
    elif kind not in KINDS:
        raise LabelpipeError(f"{root}: unknown data set kind '{kind}'; use --kind {{{', '.join(KINDS)}}}")
    source = KINDS[kind](root)
    if target_root is None and kind in ADAPTATION_SOURCES and (root / TARGET_LINK).is_dir():
        target_root = root / TARGET_LINK
    if target_root is not None:
        source = with_target(source, open_dataset(Path(target_root)))
    return source


def class_lookup(from_classes: list[str], to_classes: list[str]) -> np.ndarray:
    """256-entry table: a class index of ``from_classes`` -> the index of the same name in
    ``to_classes`` (255 when absent there); 255 stays 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    position = {name: index for index, name in enumerate(to_classes)}
    for index, name in enumerate(from_classes):
        if name in position:
            table[index] = position[name]
    return table


def read_decoded_mask(source: DatasetSource, path: Path) -> np.ndarray:
    """(H, W) class ids of one mask of ``source``: its raw reader (PIL when none), then its decoder."""
    if source.read_raw_mask is not None:
        raw = source.read_raw_mask(path)
    else:
        with Image.open(path) as im:
            raw = np.asarray(im)
    return source.decode_mask(raw) if source.decode_mask is not None else raw


def with_target(source: DatasetSource, target: DatasetSource) -> DatasetSource:
    """``source`` plus ``target``'s splits (as ``target/<split>``) and the protocol ``adapt``.

    The target's masks are mapped onto the source's classes by name (a target class the source lacks,
    e.g. Cityscapes terrain for SYNTHIA, becomes 255). When both share decoder and classes (GTA5 and
    Cityscapes) the plain decoder is kept; otherwise the result reads every mask through its own
    data set's reader and decoder (``read_raw_mask``, with ``decode_mask`` None).
    """
    missing = [name for name in source.classes if name not in target.classes]
    if missing:
        raise LabelpipeError(
            f"{target.root}: target has no class {', '.join(missing)} of {source.name}; "
            f"pick a target with the source's classes"
        )
    roles = target.protocol(None)
    splits = dict(source.splits)
    for name, samples in target.splits.items():
        splits[f"{TARGET_LINK}/{name}"] = samples
    protocols = dict(source.protocols)
    protocols[ADAPT_PROTOCOL] = {
        "labeled": source.protocol(None)["labeled"],
        "unlabeled": f"{TARGET_LINK}/{roles['unlabeled']}",
        "val": f"{TARGET_LINK}/{roles['val']}",
        "test": f"{TARGET_LINK}/{roles['test']}",
    }
    same_decoding = (
        source.classes == target.classes
        and source.decode_mask is target.decode_mask
        and getattr(source, "read_raw_mask", None) is None
        and getattr(target, "read_raw_mask", None) is None
    )
    extras = {}
    if not same_decoding:
        lookup = class_lookup(target.classes, source.classes)
        target_root = Path(target.root)

        def read_raw_mask(path: Path) -> np.ndarray:
            if Path(path).is_relative_to(target_root):
                return lookup[read_decoded_mask(target, path)]
            return read_decoded_mask(source, path)

        extras["read_raw_mask"] = read_raw_mask
    return ScannedSource(
        name=f"{source.name}->{target.name}",
        root=source.root,
        classes=list(source.classes),
        palette=list(source.palette),
        splits=splits,
        protocols=protocols,
        default_protocol=ADAPT_PROTOCOL,
        ignore_index=source.ignore_index,
        decode_mask=source.decode_mask if same_decoding else None,
        class_subsets=dict(source.class_subsets),
        problems=list(getattr(source, "problems", [])) + list(getattr(target, "problems", [])),
        **extras,
    )
