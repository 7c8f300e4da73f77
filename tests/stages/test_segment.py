"""segment: a run's (or an exported) model on loose images -> palette masks, overlays, maps; bad files skipped."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelpipe.context import load_run_model
from labelpipe.data import open_source
from labelpipe.data.transforms import to_model_input
from labelpipe.errors import LabelpipeError
from labelpipe.inference import predict_logits
from labelpipe.stages.segment import collect_inputs
from tests.conftest import run_cli

CROP = 32  # tiny.yaml's crop: the 80 x 56 photo below needs the sliding window


@pytest.fixture()
def photos(tiny_root, tmp_path) -> Path:
    """A user's folder: two data set images (one in a subfolder), a larger JPEG, and a broken PNG."""
    src = sorted((tiny_root / "images").glob("*.png"))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(src[0], folder / "a.png")
    shutil.copy(src[1], folder / "sub" / "b.png")
    big = np.concatenate([np.array(Image.open(p).convert("RGB")) for p in src[2:5]], axis=1)  # 32 x 96
    Image.fromarray(big).resize((80, 56)).save(folder / "big.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def expected_labels(run: Path, image: Path) -> np.ndarray:
    """argmax of the run's model through the sliding-window code evaluate uses."""
    _, model, _ = load_run_model(run, None)
    rgb = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)
    main, _ = predict_logits(model, to_model_input(rgb)[None], CROP)
    return main[0].argmax(0).numpy().astype(np.uint8)


@pytest.mark.slow
def test_segment_writes_masks_overlays_and_maps_and_skips_a_broken_file(pretrained_run, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", "--run", str(pretrained_run), str(photos), "--out", str(out), "--device", "cpu"]
    assert run_cli([*args, "--probabilities", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert str(photos / "broken.png") in err and err.strip().splitlines()[-1].startswith("error: 1 of 4 image(s)")

    for name, src in (("a", photos / "a.png"), ("sub/b", photos / "sub" / "b.png"), ("big", photos / "big.jpg")):
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == Image.open(src).size
        np.testing.assert_array_equal(np.array(mask), expected_labels(pretrained_run, src))
        assert Image.open(out / f"{name}_overlay.jpg").size == mask.size
        conf = np.array(Image.open(out / f"{name}_confidence.png"), np.float32) / 255
        entropy = np.array(Image.open(out / f"{name}_entropy.png"), np.float32) / 255
        assert conf.shape == entropy.shape == mask.size[::-1]
        assert conf.min() >= math.floor(255 / 11) / 255  # a max probability is at least 1/C
        assert 0 < entropy.mean() < 1
    info = json.loads((out / "segment.json").read_text())
    assert info["model"] == "pretrain" and len(info["classes"]) == 11
    assert info["failed"][0]["image"] == str(photos / "broken.png")
    assert not list(out.rglob("broken*")) and not list(out.rglob(".*.tmp-*"))


def test_masks_carry_the_data_set_palette(pretrained_run, tiny_root, photos, tmp_path):
    out = tmp_path / "out"
    assert run_cli(["segment", "--run", str(pretrained_run), str(photos / "a.png"), "--out", str(out)]) == 0
    palette = np.array(Image.open(out / "a.png").getpalette()[: 3 * 11]).reshape(11, 3)
    np.testing.assert_array_equal(palette, np.array(open_source(tiny_root).palette))
    assert not (out / "a_confidence.png").exists()  # only with --probabilities


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.9+
@pytest.mark.slow
def test_an_exported_torchscript_model_gives_the_same_masks(pretrained_run, photos, tmp_path):
    from labelpipe.stages.export import run_export

    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    model_file = run_export(run, "torchscript", None, tmp_path / "deploy" / "seg.pt", "cpu")
    by_run, by_file = tmp_path / "by_run", tmp_path / "by_file"
    images = [str(photos / "big.jpg"), str(photos / "a.png")]
    assert run_cli(["segment", "--run", str(run), *images, "--out", str(by_run)]) == 0
    # The palette and crop come from --run; the file alone would also do (classes from its JSON).
    assert run_cli(["segment", "--model-file", str(model_file), "--run", str(run), *images, "--out", str(by_file)]) == 0
    for name in ("big", "a"):
        np.testing.assert_array_equal(
            np.array(Image.open(by_run / f"{name}.png")), np.array(Image.open(by_file / f"{name}.png"))
        )
    assert json.loads((by_file / "segment.json").read_text())["model"] == "seg.pt"


def test_inputs_from_folders_files_and_globs_get_unique_names(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / sub / "photo.jpg")
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    items = collect_inputs([str(tmp_path / "x"), str(tmp_path / "*" / "*.jpg"), str(tmp_path / "y" / "photo.jpg")])
    assert [i.name for i in items] == ["photo", "photo-2"]  # x/photo.jpg once, then y's under another name
    assert [i.path for i in items] == [tmp_path / "x" / "photo.jpg", tmp_path / "y" / "photo.jpg"]
    (tmp_path / "x" / "masks").mkdir()  # an earlier run's output inside the folder is not an input
    Image.new("RGB", (4, 4)).save(tmp_path / "x" / "masks" / "old.png")
    assert [i.name for i in collect_inputs([str(tmp_path / "x")], exclude=tmp_path / "x" / "masks")] == ["photo"]
    with pytest.raises(LabelpipeError, match="no such file or folder"):
        collect_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(LabelpipeError, match="matches no PNG or JPEG"):
        collect_inputs([str(tmp_path / "*.png")])


def test_segment_without_a_model_is_a_one_line_error(photos, tmp_path, capsys):
    assert run_cli(["segment", str(photos / "a.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: segment: pass --run") and "\n" not in err


def test_a_phone_photo_is_segmented_upright(pretrained_run, tmp_path):
    """EXIF orientation 6 (stored landscape, shown portrait): the mask has the shape viewers show."""
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (48, 32), (90, 120, 40)).save(photo, exif=exif)
    out = tmp_path / "out"
    assert run_cli(["segment", "--run", str(pretrained_run), str(photo), "--out", str(out)]) == 0
    assert Image.open(out / "phone.png").size == (32, 48)
