import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import DatasetSource, SampleRef
from labelpipe.data.check import check_dataset
from labelpipe.data.cityscapes import load_cityscapes
from labelpipe.data.gta5 import load_gta5
from labelpipe.errors import LabelpipeError

# Cityscapes labelIds: 32 pixels road (7), 16 car (26), 16 unlabeled (0).
LABEL_IDS = np.array([7, 7, 26, 0], dtype=np.uint8).repeat(16).reshape(8, 8)


def make_cityscapes(root: Path) -> Path:
    for split, stems in (
        ("train", ["aachen_000000_000019", "aachen_000001_000019"]),
        ("val", ["ulm_000000_000001"]),
    ):
        for stem in stems:
            city = stem.split("_")[0]
            for folder in (root / "leftImg8bit" / split / city, root / "gtFine" / split / city):
                folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(LABEL_IDS, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def make_broken(root: Path) -> DatasetSource:
    """Five samples, one per kind of problem (plus one fine and one without a mask)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()

    def sample(name: str, image_size=(8, 8), mask_size=(8, 8), value=1, mask=True) -> SampleRef:
        if image_size is not None:
            Image.new("RGB", image_size).save(root / "images" / f"{name}.png")
        if mask_size is not None:
            Image.new("L", mask_size, value).save(root / "masks" / f"{name}.png")
        return SampleRef(name, root / "images" / f"{name}.png", root / "masks" / f"{name}.png" if mask else None)

    samples = [
        sample("fine"),
        sample("no_image", image_size=None),
        sample("no_mask", mask_size=None),
        sample("mismatch", mask_size=(8, 6)),
        sample("value", value=7),
        sample("unlabeled", mask_size=None, mask=False),
        sample("truncated"),
    ]
    data = (root / "images" / "truncated.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    return DatasetSource(
        name="broken",
        root=root,
        classes=["a", "b", "c"],
        palette=[(0, 0, 0), (1, 1, 1), (2, 2, 2)],
        splits={"train": samples, "empty": []},
        protocols={},
        default_protocol="p",
    )


def test_a_clean_tree_reports_counts_and_decoded_class_pixels(tmp_path):
    report = check_dataset(load_cityscapes(make_cityscapes(tmp_path)))
    assert report["ok"] and report["problems"] == []
    assert report["splits"]["train"]["images"] == 2 and report["splits"]["val"]["images"] == 1
    assert report["splits"]["train"]["masks"] == 2 and report["splits"]["train"]["missing_masks"] == 0
    # Decoded trainIds: road and car are named; labelId 0 counts as ignored.
    assert report["splits"]["train"]["class_pixels"]["road"] == 64
    assert report["splits"]["train"]["class_pixels"]["car"] == 32
    assert report["splits"]["train"]["ignored_pixels"] == 32
    assert report["class_pixels"]["road"] == 96 and report["class_pixels"]["sky"] == 0
    json.dumps(report)  # the CLI may write it as JSON


def test_each_problem_is_counted_and_named_on_one_line(tmp_path):
    report = check_dataset(make_broken(tmp_path))
    train = report["splits"]["train"]
    assert (train["images"], train["masks"]) == (7, 6)
    assert train["missing_images"] == 1 and train["missing_masks"] == 1
    assert train["unreadable"] == 1 and train["size_mismatches"] == 1 and train["bad_mask_values"] == 1
    problems = report["problems"]
    assert not report["ok"]
    assert all("\n" not in line for line in problems)

    def about(name: str) -> str:
        (line,) = [p for p in problems if f"/{name}.png" in p]
        return line

    assert "image file is missing" in about("no_image")
    assert about("no_mask") == f"{tmp_path / 'masks' / 'no_mask.png'}: mask file is missing (id no_mask)"
    assert "mask is 8x6 but image mismatch.png is 8x8" in about("mismatch")
    assert "mask values 7 are neither a class id (0..2) nor 255" in about("value")
    assert about("truncated").startswith(str(tmp_path / "images" / "truncated.png") + ": cannot read image")
    assert any("split 'empty' is empty" in p for p in problems)
    # Every readable mask counts, whatever is wrong with its image: fine, no_image, truncated, mismatch.
    assert train["class_pixels"]["b"] == 64 * 3 + 48


def test_problems_found_while_loading_are_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for frame in ("1", "2"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{frame}.png")
    Image.fromarray(LABEL_IDS, mode="L").save(tmp_path / "labels" / "1.png")
    report = check_dataset(load_gta5(tmp_path))
    assert report["splits"]["all"]["images"] == 1
    assert report["problems"] == [f"{tmp_path / 'images' / '2.png'}: image has no label in labels/; skipped"]


def test_samples_shared_by_splits_are_read_once(tmp_path):
    source = load_cityscapes(make_cityscapes(tmp_path))
    source.splits["again"] = list(source.splits["train"])
    calls = []
    report = check_dataset(source, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (3, 3)
    assert report["splits"]["again"]["class_pixels"] == report["splits"]["train"]["class_pixels"]


def test_only_the_requested_splits_are_checked(tmp_path):
    report = check_dataset(load_cityscapes(make_cityscapes(tmp_path)), splits=["val"])
    assert list(report["splits"]) == ["val"] and report["class_pixels"]["road"] == 32


def test_an_unknown_split_is_a_one_line_error(tmp_path):
    with pytest.raises(LabelpipeError, match="no split named 'nope'"):
        check_dataset(load_cityscapes(make_cityscapes(tmp_path)), splits=["nope"])


def test_a_decoder_error_is_reported_with_the_mask_file(tmp_path):
    root = make_cityscapes(tmp_path)
    mask = root / "gtFine/val/ulm/ulm_000000_000001_gtFine_labelIds.png"
    Image.new("RGB", (8, 8)).save(mask)  # a colour image where labelIds belong
    report = check_dataset(load_cityscapes(root), splits=["val"])
    (line,) = report["problems"]
    assert line.startswith(f"{mask}: mask has shape (8, 8, 3)")
    assert report["splits"]["val"]["unreadable"] == 1
