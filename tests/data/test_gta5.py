from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import read_mask
from labelpipe.data.cityscapes import CLASSES as CITYSCAPES_CLASSES
from labelpipe.data.gta5 import load_gta5, scan_gta5
from labelpipe.errors import LabelpipeError

LABEL_IDS = np.array([7, 26, 33, 0, 4, 24, 11, 23], dtype=np.uint8).repeat(8).reshape(8, 8)
TRAIN_IDS = np.array([0, 13, 18, 255, 255, 11, 2, 10], dtype=np.uint8).repeat(8).reshape(8, 8)


def save_label(array: np.ndarray, path: Path) -> None:
    # GTA5 ships palettised labels whose indices are Cityscapes labelIds.
    image = Image.fromarray(array, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    image.save(path)


def make_gta5(root: Path) -> Path:
    """Two good pairs, an image without label, a label of the wrong size, a label without image."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for frame in ("00001", "00002", "00003", "00004"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "images" / f"{frame}.png")
    save_label(LABEL_IDS, root / "labels" / "00001.png")
    save_label(LABEL_IDS[:6], root / "labels" / "00003.png")  # 8 wide, 6 high
    save_label(LABEL_IDS, root / "labels" / "00004.png")
    save_label(LABEL_IDS, root / "labels" / "00005.png")
    return root


def test_scan_keeps_good_pairs_and_counts_the_rest(tmp_path):
    scan = scan_gta5(make_gta5(tmp_path))
    assert [s.id for s in scan.good] == ["00001", "00004"]
    assert [s.id for s in scan.skipped] == ["00002", "00003", "00005"]
    assert len(scan.problems) == 3
    missing, mismatch, orphan = scan.problems
    assert missing.startswith(str(tmp_path / "images" / "00002.png")) and "has no label" in missing
    assert mismatch.startswith(str(tmp_path / "labels" / "00003.png"))
    assert "label is 8x6 but image 00003.png is 8x8" in mismatch
    assert orphan.startswith(str(tmp_path / "labels" / "00005.png")) and "has no image" in orphan


def test_unreadable_headers_are_skipped_not_fatal(tmp_path):
    root = make_gta5(tmp_path)
    (root / "labels" / "00004.png").write_bytes(b"not a png")
    scan = scan_gta5(root)
    assert [s.id for s in scan.good] == ["00001"]
    assert any("00004.png: cannot read label header" in p for p in scan.problems)


def test_load_exposes_only_good_pairs_and_the_problems(tmp_path):
    source = load_gta5(make_gta5(tmp_path))
    assert [s.id for s in source.split("all")] == ["00001", "00004"]
    assert source.skipped == 3 and len(source.problems) == 3
    assert source.classes == CITYSCAPES_CLASSES and source.num_classes == 19
    assert source.protocol(None) == {"labeled": "all", "unlabeled": "all", "val": "all", "test": "all"}


def test_labels_decode_with_the_cityscapes_mapping(tmp_path):
    source = load_gta5(make_gta5(tmp_path))
    sample = source.split("all")[0]
    mask = read_mask(sample.mask, source.num_classes, source.decode_mask)
    np.testing.assert_array_equal(mask, TRAIN_IDS)  # 26 car -> 13, 7 road -> 0, 4 -> 255


def test_user_train_and_val_lists_drop_skipped_pairs(tmp_path):
    root = make_gta5(tmp_path)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("00001\n00003\n")  # 00003 was skipped
    (root / "splits" / "val.txt").write_text("images/00004.png labels/00004.png\n")
    source = load_gta5(root)
    assert [s.id for s in source.split("train")] == ["00001"]
    assert [s.id for s in source.split("val")] == ["00004"]
    assert source.protocol("source") == {
        "labeled": "train",
        "unlabeled": "train",
        "val": "val",
        "test": "val",
    }


def test_a_tree_without_good_pairs_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "00001.png")
    with pytest.raises(LabelpipeError, match=r"no image has a label of the same size \(1 skipped\)"):
        load_gta5(tmp_path)


def test_a_missing_labels_folder_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(LabelpipeError, match=r"labels: folder is missing"):
        load_gta5(tmp_path)
