"""PASCAL VOC 2012, optionally with the SBD augmented masks (``SegmentationClassAug``).

::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png              palettised PNG: the pixel values are the class indices
    ROOT/SegmentationClassAug/<id>.png           optional, grey PNG of class indices (VOC + SBD, 10,582 train)
    ROOT/ImageSets/Segmentation/{train,val,trainval,train_aug}.txt
    ROOT/splits/...                              optional user lists (see labelpipe.data.split_lists)

Masks are read as indices, never converted to RGB (``read_mask`` does ``np.asarray`` on the 'P' image);
255 marks object borders and is ignored. A ``SegmentationClassAug`` mask is preferred for the ids
it has. Without ``train_aug.txt``, ``train_aug`` is every id of ``SegmentationClassAug`` not in ``val``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from labelpipe.data.base import IGNORE_INDEX, DatasetSource, SampleRef, read_split_file
from labelpipe.data.split_lists import SampleIndex, load_user_splits, resolve_split_list
from labelpipe.errors import LabelpipeError

CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

LABELED_TRAIN = "train"  # the 1,464 finely annotated VOC 2012 training images
AUGMENTED_TRAIN = "train_aug"  # VOC train + SBD: 10,582 images
UNLABELED_POOL = "train_aug_minus_train"


def voc_palette(num_colours: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the class index spread over R, G, B from the high bit down."""
    colours = []
    for index in range(num_colours):
        red = green = blue = 0
        code = index
        for bit in range(7, -1, -1):
            red |= ((code >> 0) & 1) << bit
            green |= ((code >> 1) & 1) << bit
            blue |= ((code >> 2) & 1) << bit
            code >>= 3
        colours.append((red, green, blue))
    return colours


PALETTE = voc_palette(len(CLASSES))


def _names(folder: Path, suffix: str) -> set[str]:
    # One directory listing rather than a stat per id: VOC has 17,125 JPEGs.
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {entry.name[: -len(suffix)] for entry in entries if entry.name.endswith(suffix)}


@dataclass
class _VocTree:
    """What a VOC folder holds: the image ids, the ids with a VOC or SBD mask, the set files and their ids."""

    root: Path
    images: set[str]
    aug_masks: set[str]  # ids with a SegmentationClassAug/ mask (preferred)
    voc_masks: set[str]  # ids with a SegmentationClass/ mask
    set_files: list[Path]
    # The ids of each set file (None: a file of paths, resolved by resolve_split_list).
    listed: dict[str, list[str] | None]
    # The ids of the annotated set files (not test): they get a mask path even when the file is missing,
    # so reading it later names the file.
    annotated: set[str]

    def sample(self, sample_id: str) -> SampleRef:
        if sample_id in self.aug_masks:
            mask: Path | None = self.root / "SegmentationClassAug" / f"{sample_id}.png"
        elif sample_id in self.voc_masks or sample_id in self.annotated:
            mask = self.root / "SegmentationClass" / f"{sample_id}.png"
        else:
            mask = None
        return SampleRef(id=sample_id, image=self.root / "JPEGImages" / f"{sample_id}.jpg", mask=mask)


def _scan(root: Path) -> _VocTree:
    """List the VOC folder at ``root`` (one directory listing per folder); a one-line error when it holds
    no images, or neither split lists nor SBD masks."""
    image_dir = root / "JPEGImages"
    if not image_dir.is_dir():
        hint = " (found VOC2012/ inside: point at it)" if (root / "VOC2012" / "JPEGImages").is_dir() else ""
        raise LabelpipeError(f"{root}: no JPEGImages/ folder{hint}; point at the VOC2012 folder")
    aug_masks = _names(root / "SegmentationClassAug", ".png")
    sets_dir = root / "ImageSets" / "Segmentation"
    set_files = sorted(sets_dir.glob("*.txt")) if sets_dir.is_dir() else []
    if not set_files and not aug_masks:
        raise LabelpipeError(
            f"{sets_dir}: no split lists (train.txt, val.txt) and no SegmentationClassAug/; "
            f"unpack the VOC2012 trainval archive here"
        )
    listed = {f.stem: None if _has_paths(f) else read_split_file(f) for f in set_files}
    return _VocTree(
        root=root,
        images=_names(image_dir, ".jpg"),
        aug_masks=aug_masks,
        voc_masks=_names(root / "SegmentationClass", ".png"),
        set_files=set_files,
        listed=listed,
        annotated={i for stem, ids in listed.items() if ids and stem != "test" for i in ids},
    )


def _builtin_splits(tree: _VocTree) -> tuple[dict[str, list[SampleRef]], SampleIndex]:
    """The splits of the set files, ``train_aug`` (from the SBD masks when no list names it) and the
    unlabeled pool ``train_aug_minus_train``; and the index of every sample, for the user's lists."""
    # Every image of the tree (and every listed id), so user lists may name any of them.
    all_samples = {i: tree.sample(i) for i in sorted(tree.images | tree.annotated)}
    index = SampleIndex(tree.root, all_samples.values())
    splits: dict[str, list[SampleRef]] = {}
    for set_file in tree.set_files:
        ids = tree.listed[set_file.stem]
        if ids is None:
            # train_aug.txt of the DeepLab distribution lists '/JPEGImages/x.jpg /SegmentationClassAug/x.png'.
            splits[set_file.stem] = resolve_split_list(set_file, tree.root, index)
        else:
            splits[set_file.stem] = [all_samples[i] if i in all_samples else tree.sample(i) for i in ids]
    if AUGMENTED_TRAIN not in splits and tree.aug_masks:
        val_ids = {s.id for s in splits.get("val", [])}
        splits[AUGMENTED_TRAIN] = [
            all_samples.get(i) or tree.sample(i) for i in sorted(tree.aug_masks) if i not in val_ids
        ]
    if LABELED_TRAIN in splits and AUGMENTED_TRAIN in splits:
        labeled_ids = {s.id for s in splits[LABELED_TRAIN]}
        splits[UNLABELED_POOL] = [s for s in splits[AUGMENTED_TRAIN] if s.id not in labeled_ids]
    return splits, index


def _builtin_protocols(splits: dict[str, list[SampleRef]], val: str) -> dict[str, dict[str, str]]:
    """``semi-1464`` (labeled train, unlabeled train_aug minus train) when train, val and the pool exist;
    ``semi-full`` (labeled and unlabeled train) when train exists; both validate and test on ``val``."""
    protocols: dict[str, dict[str, str]] = {}
    if LABELED_TRAIN in splits and UNLABELED_POOL in splits and "val" in splits:
        protocols["semi-1464"] = {"labeled": LABELED_TRAIN, "unlabeled": UNLABELED_POOL, "val": val, "test": val}
    if LABELED_TRAIN in splits:
        protocols["semi-full"] = {"labeled": LABELED_TRAIN, "unlabeled": LABELED_TRAIN, "val": val, "test": val}
    return protocols


def load_voc(root: Path) -> DatasetSource:
    """PASCAL VOC 2012 at ``root`` (the ``VOC2012`` folder holding ``JPEGImages/``).

    Splits: each ``ImageSets/Segmentation/*.txt`` (train, val, trainval, ...), ``train_aug`` when the
    SBD masks exist, ``train_aug_minus_train`` (the unlabeled pool of the classic 1,464 protocol), and
    the user's lists under ``root/splits/``. Protocols: ``semi-1464`` (labeled train, unlabeled
    train_aug minus train, val val, test val) when train, val and the SBD masks exist; ``semi-full``
    (labeled train, unlabeled train); ``semi-FOLDER`` per ``splits/FOLDER/labeled.txt``.
    """
    root = Path(root)
    tree = _scan(root)
    splits, index = _builtin_splits(tree)
    val = "val" if "val" in splits else LABELED_TRAIN
    protocols = _builtin_protocols(splits, val)

    pool = AUGMENTED_TRAIN if AUGMENTED_TRAIN in splits else LABELED_TRAIN
    user_splits, user_protocols = load_user_splits(root, index, pool=pool, val=val, builtin=splits)
    splits.update(user_splits)
    protocols.update(user_protocols)
    if not protocols:
        raise LabelpipeError(
            f"{root / 'ImageSets' / 'Segmentation' / 'train.txt'}: missing, so no protocol can be built; "
            f"restore ImageSets/Segmentation or add splits/NAME/labeled.txt"
        )
    default = next(name for name in ("semi-1464", "semi-full", *sorted(protocols)) if name in protocols)
    return DatasetSource(
        name="voc2012-aug" if tree.aug_masks else "voc2012",
        root=root,
        classes=list(CLASSES),
        palette=list(PALETTE),
        splits=splits,
        protocols=protocols,
        default_protocol=default,
        ignore_index=IGNORE_INDEX,
        decode_mask=None,
    )


def _has_paths(path: Path) -> bool:
    for line in path.read_text().splitlines():
        tokens = line.split("#", 1)[0].split()
        if tokens:
            return len(tokens) > 1 or tokens[0].lower().endswith((".jpg", ".png"))
    return False
