from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import read_mask, read_pair
from labelpipe.data.cityscapes import (
    CLASSES,
    LABEL_ID_TO_TRAIN_ID,
    PALETTE,
    decode_label_ids,
    load_cityscapes,
)
from labelpipe.errors import LabelpipeError

# An 8x8 labelIds mask: road, car, bicycle, unlabeled (0), static (4, not evaluated), and 255.
LABEL_IDS = np.array([7, 26, 33, 0, 4, 255, 24, 11], dtype=np.uint8).repeat(8).reshape(8, 8)
TRAIN_IDS = np.array([0, 13, 18, 255, 255, 255, 11, 2], dtype=np.uint8).repeat(8).reshape(8, 8)

FRAMES = {
    "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
    "val": ["frankfurt_000000_000294"],
}


def make_cityscapes(root: Path, frames: dict[str, list[str]] = FRAMES) -> Path:
    """A Cityscapes tree of 8x8 frames, laid out as the official archives unpack."""
    for split, stems in frames.items():
        for stem in stems:
            city = stem.split("_")[0]
            image_dir = root / "leftImg8bit" / split / city
            mask_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(image_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(LABEL_IDS, mode="L").save(mask_dir / f"{stem}_gtFine_labelIds.png")
            # The colour and instance files of the archive sit alongside and must be ignored.
            Image.new("RGB", (8, 8)).save(mask_dir / f"{stem}_gtFine_color.png")
    return root


def test_label_ids_map_to_train_ids_and_the_rest_to_ignore():
    assert LABEL_ID_TO_TRAIN_ID.shape == (256,) and LABEL_ID_TO_TRAIN_ID.dtype == np.uint8
    assert LABEL_ID_TO_TRAIN_ID[7] == 0  # road
    assert LABEL_ID_TO_TRAIN_ID[26] == 13  # car
    assert LABEL_ID_TO_TRAIN_ID[33] == 18  # bicycle
    assert LABEL_ID_TO_TRAIN_ID[0] == 255 and LABEL_ID_TO_TRAIN_ID[34] == 255 and LABEL_ID_TO_TRAIN_ID[255] == 255
    assert sorted(int(v) for v in LABEL_ID_TO_TRAIN_ID if v != 255) == list(range(19))
    np.testing.assert_array_equal(decode_label_ids(LABEL_IDS), TRAIN_IDS)


def test_class_names_and_palette_follow_train_ids():
    assert len(CLASSES) == len(PALETTE) == 19
    assert CLASSES[0] == "road" and CLASSES[13] == "car" and CLASSES[18] == "bicycle"
    assert PALETTE[0] == (128, 64, 128) and PALETTE[13] == (0, 0, 142)


def test_decode_accepts_wider_integer_arrays():
    wide = LABEL_IDS.astype(np.int32)
    wide[0, 0] = 1000  # not a labelId at all
    decoded = decode_label_ids(wide)
    assert decoded.dtype == np.uint8 and decoded[0, 0] == 255
    np.testing.assert_array_equal(decoded[1:], TRAIN_IDS[1:])


def test_decode_rejects_colour_masks():
    with pytest.raises(LabelpipeError, match="single-channel"):
        decode_label_ids(np.zeros((8, 8, 3), np.uint8))


def test_load_lists_train_and_val_with_city_slash_stem_ids(tmp_path):
    source = load_cityscapes(make_cityscapes(tmp_path))
    assert [s.id for s in source.split("train")] == [
        "aachen/aachen_000000_000019",
        "aachen/aachen_000001_000019",
        "bochum/bochum_000000_000313",
    ]
    (val,) = source.split("val")
    assert val.id == "frankfurt/frankfurt_000000_000294"
    assert val.image == tmp_path / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    assert val.mask == tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    assert source.num_classes == 19 and source.name == "cityscapes"


def test_masks_read_through_the_source_are_train_ids(tmp_path):
    source = load_cityscapes(make_cityscapes(tmp_path))
    sample = source.split("train")[0]
    mask = read_mask(sample.mask, source.num_classes, source.decode_mask, source.ignore_index)
    np.testing.assert_array_equal(mask, TRAIN_IDS)
    image, mask = read_pair(sample, source.num_classes, source.decode_mask)
    assert image.shape == (8, 8, 3) and mask.shape == (8, 8)


def test_semi_full_is_the_default_protocol(tmp_path):
    source = load_cityscapes(make_cityscapes(tmp_path))
    assert source.protocol(None) == {"labeled": "train", "unlabeled": "train", "val": "val", "test": "val"}


def test_split_folders_become_semi_protocols(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "splits" / "1_8").mkdir(parents=True)
    # The DARS / U2PL format: image path and a labelTrainIds path that does not exist here.
    (root / "splits" / "1_8" / "labeled.txt").write_text(
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n"
    )
    source = load_cityscapes(root)
    roles = source.protocol("semi-1_8")
    assert roles == {"labeled": "1_8/labeled", "unlabeled": "1_8/unlabeled", "val": "val", "test": "val"}
    (labeled,) = source.split("1_8/labeled")
    assert labeled.mask.name.endswith("_gtFine_labelIds.png")
    assert [s.id for s in source.split("1_8/unlabeled")] == [
        "aachen/aachen_000001_000019",
        "bochum/bochum_000000_000313",
    ]


def test_a_bad_line_in_a_split_list_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "splits" / "1_8").mkdir(parents=True)
    (root / "splits" / "1_8" / "labeled.txt").write_text("aachen_000000_000019\nulm_000000_000001\n")
    with pytest.raises(LabelpipeError, match=r"1_8/labeled\.txt: line 2: 'ulm_000000_000001' matches no image"):
        load_cityscapes(root)


def test_missing_folders_are_named_with_the_fix(tmp_path):
    with pytest.raises(LabelpipeError, match=r"no leftImg8bit/ folder; point at the Cityscapes folder"):
        load_cityscapes(tmp_path)
    (tmp_path / "leftImg8bit").mkdir()
    with pytest.raises(LabelpipeError, match=r"no gtFine/ folder; unpack gtFine_trainvaltest.zip"):
        load_cityscapes(tmp_path)
    (tmp_path / "gtFine").mkdir()
    with pytest.raises(LabelpipeError, match=r"leftImg8bit: no train/<city>"):
        load_cityscapes(tmp_path)


def test_a_missing_mask_is_named_when_read(tmp_path):
    root = make_cityscapes(tmp_path)
    sample = load_cityscapes(root).split("val")[0]
    sample.mask.unlink()
    with pytest.raises(LabelpipeError, match="frankfurt_000000_000294_gtFine_labelIds.png: mask file is missing"):
        read_mask(sample.mask, 19, decode_label_ids)
