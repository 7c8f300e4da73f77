"""The generic folder layout: loading, round trip through write_dataset_yaml, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from labelpipe.data.base import read_image, read_pair
from labelpipe.data.folder import load_folder_dataset, write_dataset_yaml
from labelpipe.data.montage import colour_mask, write_montage
from labelpipe.errors import LabelpipeError

CLASSES = ["background", "road", "car"]
PALETTE = [(0, 0, 0), (128, 64, 128), (0, 0, 142)]
PROTOCOL = {"labeled": "train", "unlabeled": "extra", "val": "val", "test": "val"}


def _make_folder(root: Path) -> Path:
    """A 4-image data set: a, b as PNG with masks, c as JPEG with a mask, d as PNG without one."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for sample_id in ("a", "b", "c", "d"):
        image = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
        image.save(root / "images" / (f"{sample_id}.jpg" if sample_id == "c" else f"{sample_id}.png"))
        if sample_id != "d":
            mask = rng.integers(0, 3, (8, 12)).astype(np.uint8)
            mask[0, 0] = 255
            Image.fromarray(mask).save(root / "masks" / f"{sample_id}.png")
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "val.txt").write_text("# held out\nc\n\n")
    (root / "splits" / "extra.txt").write_text("d\nghost\n")
    write_dataset_yaml(
        root,
        name="toy",
        classes=CLASSES,
        palette=PALETTE,
        protocols={"semi": PROTOCOL},
        default_protocol="semi",
        meta={"anything": {"goes": [1, 2]}},
    )
    return root


def _edit_yaml(root: Path, **changes) -> None:
    path = root / "dataset.yaml"
    content = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(yaml.safe_dump(content))


def test_round_trip_gives_classes_palette_protocols_and_splits(tmp_path: Path) -> None:
    source = load_folder_dataset(_make_folder(tmp_path))
    assert source.name == "toy"
    assert source.classes == CLASSES
    assert source.palette == PALETTE
    assert source.num_classes == 3
    assert source.protocols == {"semi": PROTOCOL}
    assert source.default_protocol == "semi"
    assert source.protocol(None) == PROTOCOL
    assert source.ignore_index == 255
    assert set(source.splits) == {"train", "val", "extra"}
    assert [s.id for s in source.split("val")] == ["c"]


def test_sample_paths_prefer_existing_png_then_jpg_and_mask_only_if_present(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    source = load_folder_dataset(root)
    by_id = {s.id: s for name in source.splits for s in source.splits[name]}
    assert by_id["a"].image == root / "images" / "a.png"
    assert by_id["a"].mask == root / "masks" / "a.png"
    assert by_id["c"].image == root / "images" / "c.jpg"
    assert by_id["d"].mask is None
    assert by_id["ghost"].image == root / "images" / "ghost.png"
    image, mask = read_pair(by_id["c"], source.num_classes)
    assert image.shape == (8, 12, 3) and mask.shape == (8, 12)
    with pytest.raises(LabelpipeError, match="ghost.png: image file is missing"):
        read_image(by_id["ghost"].image)


def test_single_protocol_needs_no_default(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    _edit_yaml(root, default_protocol=None)
    assert load_folder_dataset(root).default_protocol == "semi"


def test_missing_palette_gets_distinct_default_colours(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    _edit_yaml(root, palette=None)
    palette = load_folder_dataset(root).palette
    assert len(palette) == 3 and len(set(palette)) == 3 and palette[0] == (0, 0, 0)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda root: (root / "dataset.yaml").unlink(), "dataset.yaml is missing"),
        (lambda root: (root / "dataset.yaml").write_text("classes: [a, b\npalette: ]"), "invalid YAML"),
        (lambda root: (root / "dataset.yaml").write_text("- just\n- a list\n"), "must be a mapping"),
        (lambda root: _edit_yaml(root, classes=None), "'classes' is missing or empty"),
        (lambda root: _edit_yaml(root, classes=[]), "'classes' is missing or empty"),
        (lambda root: _edit_yaml(root, palette=[[0, 0, 0]]), "palette has 1 colours but there are 3 classes"),
        (lambda root: _edit_yaml(root, palette=[[0, 0, 0], [1, 2], [3, 4, 5]]), "palette.1"),
        (lambda root: _edit_yaml(root, palette=[[0, 0, 0], [1, 2, 300], [3, 4, 5]]), "palette.1.2"),
        (lambda root: _edit_yaml(root, classes=["a", "a", "b"]), "appear twice"),
        (lambda root: _edit_yaml(root, protocols=None), "'protocols' is missing"),
        (
            lambda root: _edit_yaml(root, protocols={"semi": {**PROTOCOL, "val": "nowhere"}}),
            "uses split 'nowhere' as val but .*nowhere.txt does not exist",
        ),
        (lambda root: _edit_yaml(root, protocols={"semi": {"labeled": "train"}}), "protocols.semi.unlabeled"),
        (lambda root: _edit_yaml(root, default_protocol="da"), "default_protocol 'da' is not one of"),
        (lambda root: _edit_yaml(root, ignore_index=1), "ignore_index 1 is a class id"),
    ],
)
def test_each_broken_dataset_yaml_is_a_one_line_error_naming_the_file(tmp_path: Path, break_it, message) -> None:
    root = _make_folder(tmp_path)
    break_it(root)
    with pytest.raises(LabelpipeError, match=message) as caught:
        load_folder_dataset(root)
    text = str(caught.value)
    assert "\n" not in text
    assert str(root / "dataset.yaml") in text


def test_unknown_top_level_keys_are_ignored(tmp_path: Path) -> None:
    root = _make_folder(tmp_path)
    _edit_yaml(root, meta={"digitscapes": {"seed": 3}}, comment="free text")
    assert load_folder_dataset(root).classes == CLASSES


def test_colour_mask_paints_palette_and_white_ignore() -> None:
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    coloured = colour_mask(mask, PALETTE, 255)
    assert coloured[0, 1].tolist() == list(PALETTE[1])
    assert coloured[1, 1].tolist() == [255, 255, 255]


def test_montage_handles_samples_without_masks(tmp_path: Path) -> None:
    source = load_folder_dataset(_make_folder(tmp_path / "data"))
    source.splits["extra"] = source.splits["extra"][:1]  # drop the missing 'ghost' image
    out = write_montage(source, "extra", tmp_path / "montage.png", n=16)
    assert out.is_file() and out.stat().st_size > 0
