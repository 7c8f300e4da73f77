"""Cityscapes: ``leftImg8bit/`` images and ``gtFine/`` labelIds masks, 19 evaluation classes.

::

    ROOT/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png
    ROOT/splits/...                         optional user lists (see labelpipe.data.split_lists)

The 34 labelIds are mapped to the 19 trainIds in code (:data:`LABEL_ID_TO_TRAIN_ID`, a 256-entry
lookup table, everything else 255), so the ``labelTrainIds`` files of the official scripts are not
needed. Ids are ``<city>/<stem>``. GTA5 labels use the same labelIds and reuse :func:`decode_label_ids`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelpipe.data.base import IGNORE_INDEX, DatasetSource, SampleRef
from labelpipe.data.split_lists import load_user_splits
from labelpipe.errors import LabelpipeError

CLASSES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]

PALETTE = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]

# labelId -> trainId for the 19 evaluated classes (cityscapesScripts' labels.py). Every other labelId
# (unlabeled, ego vehicle, ground, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
# trailer, license plate, ...) is ignored.
TRAIN_ID_OF_LABEL_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _lookup_table(mapping: dict[int, int]) -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for source_id, class_id in mapping.items():
        table[source_id] = class_id
    table.setflags(write=False)
    return table


LABEL_ID_TO_TRAIN_ID = _lookup_table(TRAIN_ID_OF_LABEL_ID)

IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val")


def apply_lookup(raw: np.ndarray, table: np.ndarray, what: str) -> np.ndarray:
    """(H, W) uint8 class ids from (H, W) raw ids through a 256-entry table; ids >= 256 -> 255."""
    if raw.ndim != 2:
        raise LabelpipeError(f"mask has shape {raw.shape}; {what} masks must be single-channel PNGs")
    if raw.dtype == np.uint8:
        return table[raw]
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.uint8)
    inside = (raw >= 0) & (raw < table.size)
    out[inside] = table[raw[inside].astype(np.intp)]
    return out


def decode_label_ids(raw: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes labelIds -> (H, W) uint8 trainIds 0..18, 255 for everything unevaluated."""
    return apply_lookup(raw, LABEL_ID_TO_TRAIN_ID, "Cityscapes labelIds")


def _scan_split(root: Path, split: str) -> list[SampleRef]:
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        return []
    samples = []
    for city_dir in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        for image in sorted(city_dir.glob(f"*{IMAGE_SUFFIX}")):
            stem = image.name[: -len(IMAGE_SUFFIX)]
            # The expected mask path even when it is missing, so reading it later names the file.
            mask = root / "gtFine" / split / city_dir.name / f"{stem}{MASK_SUFFIX}"
            samples.append(SampleRef(id=f"{city_dir.name}/{stem}", image=image, mask=mask))
    return samples


def load_cityscapes(root: Path) -> DatasetSource:
    """Cityscapes at ``root`` (the folder holding ``leftImg8bit/`` and ``gtFine/``).

    Splits ``train`` and ``val``, plus the user's lists under ``root/splits/``. Protocols:
    ``semi-full`` (labeled train, unlabeled train, val val, test val) and ``semi-FOLDER`` for each
    ``splits/FOLDER/labeled.txt`` (e.g. ``semi-1_8``; unlabeled defaults to train minus labeled).
    """
    root = Path(root)
    if not (root / "leftImg8bit").is_dir():
        raise LabelpipeError(
            f"{root}: no leftImg8bit/ folder; point at the Cityscapes folder holding leftImg8bit/ and gtFine/"
        )
    if not (root / "gtFine").is_dir():
        raise LabelpipeError(f"{root}: no gtFine/ folder; unpack gtFine_trainvaltest.zip next to leftImg8bit/")
    splits = {split: _scan_split(root, split) for split in SPLITS}
    if not any(splits.values()):
        raise LabelpipeError(
            f"{root / 'leftImg8bit'}: no train/<city>/*{IMAGE_SUFFIX} or val/<city>/*{IMAGE_SUFFIX} images; "
            f"unpack leftImg8bit_trainvaltest.zip here"
        )
    all_samples = [sample for split in SPLITS for sample in splits[split]]
    user_splits, user_protocols = load_user_splits(
        root, all_samples, pool="train", val="val", builtin=splits, suffixes=(IMAGE_SUFFIX[:-4],)
    )
    splits.update(user_splits)
    protocols = {"semi-full": {"labeled": "train", "unlabeled": "train", "val": "val", "test": "val"}}
    protocols.update(user_protocols)
    return DatasetSource(
        name="cityscapes",
        root=root,
        classes=list(CLASSES),
        palette=list(PALETTE),
        splits=splits,
        protocols=protocols,
        default_protocol="semi-full",
        ignore_index=IGNORE_INDEX,
        decode_mask=decode_label_ids,
    )
