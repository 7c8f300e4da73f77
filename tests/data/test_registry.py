import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import read_mask
from labelpipe.data.registry import KINDS, class_lookup, detect_kind, open_dataset, read_decoded_mask
from labelpipe.errors import LabelpipeError

LAYOUTS = {
    "cityscapes": ["leftImg8bit", "gtFine"],
    "voc": ["JPEGImages", "SegmentationClass"],
    "gta5": ["images", "labels"],
    "synthia": ["RGB", "GT/LABELS"],
}

# Cityscapes labelIds: road 7, car 26, terrain 22 (not a SYNTHIA class), unlabeled 0.
CITYSCAPES_MASK = np.array([7, 26, 22, 0], dtype=np.uint8).repeat(16).reshape(8, 8)


def make_folders(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def make_cityscapes(root: Path) -> Path:
    for split, stem in (("train", "aachen_000000_000019"), ("val", "frankfurt_000000_000294")):
        city = stem.split("_")[0]
        make_folders(root, [f"leftImg8bit/{split}/{city}", f"gtFine/{split}/{city}"])
        Image.new("RGB", (8, 8)).save(root / f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
        Image.fromarray(CITYSCAPES_MASK, mode="L").save(root / f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png")
    return root


def make_gta5(root: Path) -> Path:
    make_folders(root, ["images", "labels"])
    Image.new("RGB", (8, 8)).save(root / "images" / "00001.png")
    Image.fromarray(CITYSCAPES_MASK, mode="L").save(root / "labels" / "00001.png")
    return root


def make_synthia(root: Path) -> Path:
    make_folders(root, ["RGB", "GT/LABELS"])
    Image.new("RGB", (8, 8)).save(root / "RGB" / "0000000.png")
    # Single-channel 16-bit (PIL writes those exactly): road 3, car 8.
    labels = np.array([3, 8], dtype=np.uint16).repeat(32).reshape(8, 8)
    Image.fromarray(labels).save(root / "GT" / "LABELS" / "0000000.png")
    return root


def test_kinds_name_every_loader():
    assert set(KINDS) == {"folder", "cityscapes", "voc", "gta5", "synthia"}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_each_layout_is_detected(tmp_path, kind):
    assert detect_kind(make_folders(tmp_path, LAYOUTS[kind])) == kind


def test_dataset_yaml_wins_over_folder_names(tmp_path):
    make_folders(tmp_path, ["images", "labels"])
    (tmp_path / "dataset.yaml").write_text("classes: [a]\n")
    assert detect_kind(tmp_path) == "folder"


def test_an_unknown_tree_names_the_root_and_the_fix(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(LabelpipeError) as error:
        open_dataset(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: unknown data set layout") and "--kind" in message
    assert "\n" not in message


def test_pointing_one_level_too_high_names_the_right_folder(tmp_path):
    make_folders(tmp_path / "VOC2012", LAYOUTS["voc"])
    with pytest.raises(LabelpipeError, match=r"VOC2012 looks like voc; point at that folder"):
        open_dataset(tmp_path)


def test_a_missing_root_and_an_unknown_kind_are_named(tmp_path):
    with pytest.raises(LabelpipeError, match=r"nowhere: data set folder does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(LabelpipeError, match=r"unknown data set kind 'kitti'; use --kind"):
        open_dataset(tmp_path, "kitti")


def test_detected_and_explicit_kinds_open_the_same_source(tmp_path):
    root = make_cityscapes(tmp_path)
    assert open_dataset(root).name == open_dataset(root, "cityscapes").name == "cityscapes"


def test_an_explicit_kind_on_the_wrong_tree_names_what_is_missing(tmp_path):
    make_folders(tmp_path, LAYOUTS["gta5"])
    with pytest.raises(LabelpipeError, match="no leftImg8bit/ folder"):
        open_dataset(tmp_path, "cityscapes")


def test_the_folder_kind_is_loaded_by_the_folder_adapter(tmp_path):
    make_folders(tmp_path, ["images", "masks", "splits"])
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    (tmp_path / "dataset.yaml").write_text(
        "name: tiny\nclasses: [bg, fg]\nprotocols: {p: {labeled: train, unlabeled: train, val: train, test: train}}\n"
    )
    source = open_dataset(tmp_path)
    assert source.name == "tiny" and [s.id for s in source.split("train")] == ["a"]


def test_class_lookup_maps_by_name():
    table = class_lookup(["road", "terrain", "car"], ["road", "car"])
    assert table.shape == (256,)
    assert table[0] == 0 and table[1] == 255 and table[2] == 1 and table[255] == 255


def test_gta5_with_a_cityscapes_target_link_gets_the_adapt_protocol(tmp_path):
    gta5 = make_gta5(tmp_path / "gta5")
    os.symlink(make_cityscapes(tmp_path / "cityscapes"), gta5 / "target")
    source = open_dataset(gta5)
    assert source.default_protocol == "adapt"
    assert source.protocol(None) == {
        "labeled": "all",
        "unlabeled": "target/train",
        "val": "target/val",
        "test": "target/val",
    }
    # Same classes and decoder: the plain read_mask path keeps working for both domains.
    for split in ("all", "target/val"):
        sample = source.split(split)[0]
        mask = read_mask(sample.mask, source.num_classes, source.decode_mask)
        assert mask[0, 0] == 0 and mask[2, 0] == 13


def test_synthia_with_a_cityscapes_target_maps_the_target_onto_16_classes(tmp_path):
    synthia = make_synthia(tmp_path / "synthia")
    cityscapes = make_cityscapes(tmp_path / "cityscapes")
    source = open_dataset(synthia, target_root=cityscapes)
    assert source.num_classes == 16 and "mIoU-13" in source.class_subsets
    target_mask = read_decoded_mask(source, source.split("target/val")[0].mask)
    # road -> 0, car -> 12 (its index among the 16), terrain -> 255, unlabeled -> 255
    np.testing.assert_array_equal(target_mask[::2, 0], [0, 12, 255, 255])
    source_mask = read_decoded_mask(source, source.split("all")[0].mask)
    np.testing.assert_array_equal(source_mask[::4, 0], [0, 12])


def test_a_target_without_the_sources_classes_is_refused(tmp_path):
    gta5 = make_gta5(tmp_path / "gta5")
    voc = make_folders(tmp_path / "voc", ["JPEGImages", "ImageSets/Segmentation"])
    Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / "a.jpg")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    with pytest.raises(LabelpipeError, match="target has no class road"):
        open_dataset(gta5, target_root=voc)
