import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import read_mask
from labelpipe.data.synthia import (
    CITYSCAPES_TRAIN_ID_OF_SYNTHIA_ID,
    CLASS_SUBSETS,
    CLASSES,
    decode_synthia_labels,
    load_synthia,
    read_synthia_label,
)
from labelpipe.errors import LabelpipeError


def _paeth(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    estimate = left + up - up_left
    to_left, to_up, to_up_left = (np.abs(estimate - v) for v in (left, up, up_left))
    return np.where((to_left <= to_up) & (to_left <= to_up_left), left, np.where(to_up <= to_up_left, up, up_left))


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit PNG (1 to 4 channels) written from the spec, as SYNTHIA's are: PIL cannot write these.

    Rows cycle through the five PNG filters so the reader is tested against each of them.
    """
    array = np.asarray(array, dtype=">u2")
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = 2 * channels
    rows = array.reshape(height, width * bpp // 2).view(np.uint8).astype(np.int64)
    previous = np.zeros(width * bpp, np.int64)
    body = bytearray()
    for y in range(height):
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), previous[:-bpp]])
        kind = y % 5
        predictor = [0 * row, left, previous, (left + previous) // 2, _paeth(left, previous, up_left)][kind]
        body.append(kind)
        body.extend(((row - predictor) % 256).astype(np.uint8).tobytes())
        previous = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(body))) + chunk(b"IEND", b"")
    )


# SYNTHIA ids: road 3, car 8, sky 1, wall 21, bicycle 11, terrain 16 (not evaluated), void 0, and 300
# (not an id: its low byte 44 and high byte 1 must not be confused with anything).
CLASS_IDS = np.array([3, 8, 1, 21, 11, 16, 0, 300], dtype=np.uint16).repeat(8).reshape(8, 8)
EXPECTED = np.array([0, 12, 9, 3, 15, 255, 255, 255], dtype=np.uint8).repeat(8).reshape(8, 8)


def label_array(channels: int = 3) -> np.ndarray:
    instance = ((np.arange(64).reshape(8, 8) * 1009) % 65536).astype(np.uint16)  # varied high and low bytes
    planes = [CLASS_IDS, instance, np.full((8, 8), 65535, np.uint16), np.full((8, 8), 7, np.uint16)]
    return np.stack(planes[:channels], axis=-1)


def make_synthia(root: Path) -> Path:
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    for frame in ("0000000", "0000001"):
        Image.new("RGB", (8, 8), (5, 5, 5)).save(root / "RGB" / f"{frame}.png")
        write_png16(root / "GT" / "LABELS" / f"{frame}.png", label_array())
    Image.new("RGB", (8, 8)).save(root / "RGB" / "0000002.png")  # no label: skipped and counted
    return root


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_the_first_channel_of_a_16_bit_png_is_read_exactly(tmp_path, channels):
    path = tmp_path / "label.png"
    write_png16(path, label_array(channels))
    labels = read_synthia_label(path)
    assert labels.shape == (8, 8) and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, CLASS_IDS)


def test_plain_pil_squeezes_multi_channel_16_bit_pngs(tmp_path):
    # Why read_synthia_label exists: PIL keeps only the high bytes, all zero for class ids < 256.
    path = tmp_path / "label.png"
    write_png16(path, label_array(3))
    squeezed = np.asarray(Image.open(path))
    assert squeezed.dtype == np.uint8 and not np.array_equal(squeezed[..., 0], CLASS_IDS)
    with pytest.raises(LabelpipeError, match="read_synthia_label"):
        decode_synthia_labels(squeezed)


def test_synthia_ids_map_to_the_16_shared_classes():
    np.testing.assert_array_equal(decode_synthia_labels(CLASS_IDS), EXPECTED)
    np.testing.assert_array_equal(decode_synthia_labels(label_array(3)), EXPECTED)  # first channel used


def test_the_mapping_is_the_standard_one():
    assert CITYSCAPES_TRAIN_ID_OF_SYNTHIA_ID == {
        3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7,
        6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
    }  # fmt: skip
    assert CLASSES == [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
    ]  # fmt: skip


def test_the_13_class_subset_leaves_out_wall_fence_and_pole():
    subset = CLASS_SUBSETS["mIoU-13"]
    assert len(subset) == 13
    assert {CLASSES[i] for i in range(16) if i not in subset} == {"wall", "fence", "pole"}


def test_load_pairs_frames_and_reads_masks_through_its_reader(tmp_path):
    source = load_synthia(make_synthia(tmp_path))
    assert [s.id for s in source.split("all")] == ["0000000", "0000001"]
    assert source.skipped == 1 and "0000002.png: image has no label" in source.problems[0]
    assert source.num_classes == 16 and source.class_subsets == CLASS_SUBSETS
    sample = source.split("all")[0]
    decoded = source.decode_mask(source.read_raw_mask(sample.mask))
    np.testing.assert_array_equal(decoded, EXPECTED)


def test_reading_through_plain_read_mask_fails_loudly_not_silently(tmp_path):
    source = load_synthia(make_synthia(tmp_path))
    sample = source.split("all")[0]
    with pytest.raises(LabelpipeError, match="16-bit"):
        read_mask(sample.mask, source.num_classes, source.decode_mask)


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(LabelpipeError, match="no RGB/ and GT/LABELS/ folders"):
        load_synthia(tmp_path)


def test_a_missing_label_file_is_named(tmp_path):
    with pytest.raises(LabelpipeError, match="nothere.png: label file is missing"):
        read_synthia_label(tmp_path / "nothere.png")
