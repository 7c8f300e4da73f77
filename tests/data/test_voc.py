from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import read_mask
from labelpipe.data.voc import CLASSES, PALETTE, load_voc, voc_palette
from labelpipe.errors import LabelpipeError

TRAIN = ["2007_000032", "2007_000039"]
VAL = ["2007_000033"]
SBD_ONLY = ["2008_000002", "2008_000003"]  # SBD masks only: the unlabeled pool of the 1,464 protocol

# Background, person (15) and the 255 border, as VOC draws object outlines.
MASK = np.zeros((8, 8), np.uint8)
MASK[2:6, 2:6] = 255
MASK[3:5, 3:5] = 15


def save_palettised(array: np.ndarray, path: Path) -> None:
    """A mask the way VOC ships it: mode 'P' with the VOC colour map."""
    image = Image.fromarray(array, mode="P")
    image.putpalette([c for colour in voc_palette(256) for c in colour])
    image.save(path)


def make_voc(root: Path, augmented: bool = True) -> Path:
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for sample_id in TRAIN + VAL + SBD_ONLY:
        Image.new("RGB", (8, 8), (90, 60, 30)).save(root / "JPEGImages" / f"{sample_id}.jpg")
    for sample_id in TRAIN + VAL:
        save_palettised(MASK, root / "SegmentationClass" / f"{sample_id}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL) + "\n")
    (root / "ImageSets/Segmentation/trainval.txt").write_text("\n".join(TRAIN + VAL) + "\n")
    if augmented:
        (root / "SegmentationClassAug").mkdir()
        for sample_id in TRAIN + VAL + SBD_ONLY:
            # The SBD distribution stores grey index PNGs.
            Image.fromarray(MASK, mode="L").save(root / "SegmentationClassAug" / f"{sample_id}.png")
    return root


def test_palettised_masks_read_as_indices_not_colours(tmp_path):
    path = tmp_path / "mask.png"
    save_palettised(MASK, path)
    assert Image.open(path).mode == "P"
    mask = read_mask(path, len(CLASSES))
    np.testing.assert_array_equal(mask, MASK)
    assert set(np.unique(mask).tolist()) == {0, 15, 255}


def test_classes_and_palette_are_the_voc_ones():
    assert len(CLASSES) == len(PALETTE) == 21
    assert CLASSES[0] == "background" and CLASSES[15] == "person" and CLASSES[20] == "tvmonitor"
    assert PALETTE[0] == (0, 0, 0) and PALETTE[1] == (128, 0, 0) and PALETTE[15] == (192, 128, 128)
    assert voc_palette(256)[255] == (224, 224, 192)  # the border colour


def test_splits_come_from_image_sets_and_sbd(tmp_path):
    source = load_voc(make_voc(tmp_path))
    assert [s.id for s in source.split("train")] == TRAIN
    assert [s.id for s in source.split("val")] == VAL
    assert [s.id for s in source.split("trainval")] == TRAIN + VAL
    # Without train_aug.txt: every SBD id not in val.
    assert [s.id for s in source.split("train_aug")] == sorted(TRAIN + SBD_ONLY)
    assert [s.id for s in source.split("train_aug_minus_train")] == SBD_ONLY
    assert source.split("train")[0].image == tmp_path / "JPEGImages" / "2007_000032.jpg"


def test_augmented_masks_are_preferred(tmp_path):
    source = load_voc(make_voc(tmp_path))
    assert source.split("train")[0].mask == tmp_path / "SegmentationClassAug" / "2007_000032.png"
    assert source.name == "voc2012-aug"


def test_semi_1464_uses_sbd_as_the_unlabeled_pool(tmp_path):
    source = load_voc(make_voc(tmp_path))
    assert source.default_protocol == "semi-1464"
    assert source.protocol("semi-1464") == {
        "labeled": "train",
        "unlabeled": "train_aug_minus_train",
        "val": "val",
        "test": "val",
    }


def test_deeplab_style_train_aug_list_is_used_when_present(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(
        "/JPEGImages/2008_000003.jpg /SegmentationClassAug/2008_000003.png\n"
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
    )
    source = load_voc(root)
    assert [s.id for s in source.split("train_aug")] == ["2008_000003", "2007_000032"]
    assert [s.id for s in source.split("train_aug_minus_train")] == ["2008_000003"]


def test_without_sbd_only_the_classic_splits_exist(tmp_path):
    source = load_voc(make_voc(tmp_path, augmented=False))
    assert "train_aug" not in source.splits and "semi-1464" not in source.protocols
    assert source.default_protocol == "semi-full"
    sample = source.split("train")[0]
    assert sample.mask == tmp_path / "SegmentationClass" / "2007_000032.png"
    np.testing.assert_array_equal(read_mask(sample.mask, 21, source.decode_mask), MASK)


def test_user_split_folders_take_their_unlabeled_from_train_aug(tmp_path):
    root = make_voc(tmp_path)
    (root / "splits" / "92").mkdir(parents=True)
    (root / "splits" / "92" / "labeled.txt").write_text("2007_000039\n")
    source = load_voc(root)
    assert source.protocol("semi-92")["unlabeled"] == "92/unlabeled"
    assert [s.id for s in source.split("92/unlabeled")] == ["2007_000032", "2008_000002", "2008_000003"]


def test_pointing_at_vocdevkit_suggests_voc2012(tmp_path):
    make_voc(tmp_path / "VOC2012")
    with pytest.raises(LabelpipeError, match="no JPEGImages/ folder .*found VOC2012/ inside"):
        load_voc(tmp_path)


def test_a_tree_without_lists_or_sbd_names_the_missing_lists(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(LabelpipeError, match=r"ImageSets/Segmentation: no split lists"):
        load_voc(tmp_path)


def test_a_listed_id_without_its_mask_is_named_when_read(tmp_path):
    root = make_voc(tmp_path, augmented=False)
    (root / "SegmentationClass" / "2007_000033.png").unlink()
    sample = load_voc(root).split("val")[0]
    with pytest.raises(LabelpipeError, match=r"2007_000033.png: mask file is missing"):
        read_mask(sample.mask, 21)
