"""SYNTHIA-RAND-CITYSCAPES: 9,400 rendered frames, evaluated on the 16 classes shared with Cityscapes.

::

    ROOT/RGB/<id>.png
    ROOT/GT/LABELS/<id>.png       16-bit PNG, class id in the FIRST channel (instance id in the second)
    ROOT/splits/{train,val}.txt   optional user lists (see labelpipe.data.split_lists)

Reading the labels: PIL reads a 16-bit *single*-channel PNG exactly, but squeezes a 16-bit
multi-channel one to 8 bits by keeping each sample's high byte (all zeros for ids < 256), silently;
imageio's default PNG plugin is PIL, and OpenCV is not a dependency. :func:`read_synthia_label`
therefore lets PIL's decoder unfilter the rows as usual and unpacks the samples twice, once for the
high and once for the low bytes (the little-endian unpacker applied to big-endian data), which gives
the exact 16-bit first channel. OpenCV is used instead only if that ever fails and ``cv2`` is installed.

Masks are read through ``source.read_raw_mask`` (see :class:`labelpipe.data.base.DatasetSource`):
the shared ``read_mask`` of ``labelpipe.data.base`` reads with plain PIL, which cannot read these
files; until it takes the reader, :func:`decode_synthia_labels` refuses PIL's 8-bit squeeze with
a clear error rather than returning an all-ignore mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from labelpipe.data.base import IGNORE_INDEX
from labelpipe.data.cityscapes import CLASSES as CITYSCAPES_CLASSES
from labelpipe.data.cityscapes import PALETTE as CITYSCAPES_PALETTE
from labelpipe.data.cityscapes import apply_lookup
from labelpipe.data.gta5 import ScannedSource, pair_splits, scan_pairs
from labelpipe.errors import LabelpipeError

# SYNTHIA-RAND-CITYSCAPES class id -> Cityscapes trainId, the 16 classes the benchmark evaluates.
# Ids left out (0 void, 13 parking-slot, 14 road-work, 16 terrain, 18 truck, 20 train, 22 lanemarking)
# are ignored: terrain, truck and train are not compared in SYNTHIA -> Cityscapes.
CITYSCAPES_TRAIN_ID_OF_SYNTHIA_ID = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    1: 10,  # sky
    10: 11,  # person (SYNTHIA: pedestrian)
    17: 12,  # rider
    8: 13,  # car
    19: 15,  # bus
    12: 17,  # motorcycle
    11: 18,  # bicycle
}

_TRAIN_IDS = sorted(CITYSCAPES_TRAIN_ID_OF_SYNTHIA_ID.values())
CLASSES = [CITYSCAPES_CLASSES[t] for t in _TRAIN_IDS]  # the 16 classes, in Cityscapes order
PALETTE = [CITYSCAPES_PALETTE[t] for t in _TRAIN_IDS]
# The 13-class mean reported alongside the 16-class one leaves out wall, fence and pole.
CLASS_SUBSETS = {"mIoU-13": [i for i, name in enumerate(CLASSES) if name not in ("wall", "fence", "pole")]}

SYNTHIA_ID_TO_CLASS = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
for _synthia_id, _train_id in CITYSCAPES_TRAIN_ID_OF_SYNTHIA_ID.items():
    SYNTHIA_ID_TO_CLASS[_synthia_id] = _TRAIN_IDS.index(_train_id)
SYNTHIA_ID_TO_CLASS.setflags(write=False)

# PIL raw modes of 16-bit multi-channel PNGs, and the unpacker that keeps the low bytes instead.
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _first_channel_pil(path: Path) -> np.ndarray | None:
    """(H, W) uint16 first channel via PIL, or None when PIL cannot give it exactly."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "L", "P"):
            return np.asarray(im).astype(np.uint16)
        if len(im.tile) != 1:
            return None
        tile = im.tile[0]
        rawmode = tile[3] if isinstance(tile[3], str) else tile[3][0]
        if rawmode in ("RGB", "RGBA"):  # 8-bit colour: exact as it is
            return np.asarray(im)[..., 0].astype(np.uint16)
        low_rawmode = _LOW_BYTE_RAWMODE.get(rawmode)
        if low_rawmode is None:
            return None
        high = np.asarray(im)[..., 0].astype(np.uint16)
    with Image.open(path) as im:
        tile = im.tile[0]
        args = low_rawmode if isinstance(tile[3], str) else (low_rawmode, *tile[3][1:])
        im.tile = [tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)]
        low = np.asarray(im)[..., 0].astype(np.uint16)
    return (high << 8) | low


def _first_channel_cv2(path: Path) -> np.ndarray | None:
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError:
        return None
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        return None
    # OpenCV orders colour channels B, G, R(, A): the PNG's first channel is index 2.
    return array if array.ndim == 2 else array[..., 2]


def read_synthia_label(path: Path) -> np.ndarray:
    """(H, W) uint16 SYNTHIA class ids: the first channel of the 16-bit label PNG, exact."""
    path = Path(path)
    if not path.is_file():
        raise LabelpipeError(f"{path}: label file is missing; restore it or remove its id from the split list")
    try:
        array = _first_channel_pil(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise LabelpipeError(f"{path}: cannot read label ({exc}); replace the file") from exc
    if array is None:
        array = _first_channel_cv2(path)
    if array is None:
        raise LabelpipeError(
            f"{path}: cannot read this 16-bit PNG's first channel with PIL; install opencv-python-headless"
        )
    return array


def decode_synthia_labels(raw: np.ndarray) -> np.ndarray:
    """(H, W) SYNTHIA ids (or (H, W, C): first channel) -> (H, W) uint8 ids of the 16 classes, 255 else."""
    if raw.ndim == 3:
        if raw.dtype == np.uint8:
            raise LabelpipeError(
                "SYNTHIA label read as 8-bit colour: plain PIL drops the 16-bit class ids; "
                "read it with labelpipe.data.synthia.read_synthia_label (source.read_raw_mask)"
            )
        raw = raw[..., 0]
    return apply_lookup(raw, SYNTHIA_ID_TO_CLASS, "SYNTHIA")


def load_synthia(root: Path) -> ScannedSource:
    """SYNTHIA-RAND-CITYSCAPES at ``root`` (the folder holding ``RGB/`` and ``GT/LABELS/``).

    Pairs without a label or of mismatched size are skipped and listed in ``problems``. Split ``all``
    plus the user's lists; protocol ``source`` as for GTA5. Classes: the 16 shared with Cityscapes;
    ``class_subsets["mIoU-13"]`` for the 13-class mean.
    """
    root = Path(root)
    if not (root / "RGB").is_dir() or not (root / "GT" / "LABELS").is_dir():
        raise LabelpipeError(f"{root}: no RGB/ and GT/LABELS/ folders; point at the SYNTHIA-RAND-CITYSCAPES folder")
    scan = scan_pairs(root / "RGB", root / "GT" / "LABELS")
    splits, protocols = pair_splits(root, scan, "SYNTHIA-RAND-CITYSCAPES archive")
    return ScannedSource(
        name="synthia",
        root=root,
        classes=list(CLASSES),
        palette=list(PALETTE),
        splits=splits,
        protocols=protocols,
        default_protocol="source",
        ignore_index=IGNORE_INDEX,
        decode_mask=decode_synthia_labels,
        class_subsets={name: list(ids) for name, ids in CLASS_SUBSETS.items()},
        problems=list(scan.problems),
        read_raw_mask=read_synthia_label,
    )
