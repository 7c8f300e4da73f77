"""Bad input: one clear line on stderr naming the file and the fix, exit 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.cli import main
from tests.conftest import TINY_RECIPE


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    err = capsys.readouterr().err.strip()
    return info.value.code, err


def pretrain_args(data: Path, run: Path) -> list[str]:
    return [
        "pretrain",
        "--config",
        str(TINY_RECIPE),
        "--data",
        str(data),
        "--run",
        str(run),
        "--device",
        "cpu",
    ]


def first_id(root: Path, split: str = "source_train") -> str:
    return (root / "splits" / f"{split}.txt").read_text().split()[0]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


def test_missing_image_is_named(tiny_copy, tmp_path, capsys):
    image = tiny_copy / "images" / f"{first_id(tiny_copy)}.png"
    image.unlink()
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, str(image), "missing")
    assert not (tmp_path / "run" / "pretrain" / "model.safetensors").exists()


def test_unreadable_image_is_named(tiny_copy, tmp_path, capsys):
    image = tiny_copy / "images" / f"{first_id(tiny_copy)}.png"
    image.write_bytes(b"not a png")
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, str(image), "cannot read image")


def test_mask_values_out_of_range_are_named(tiny_copy, tmp_path, capsys):
    mask_path = tiny_copy / "masks" / f"{first_id(tiny_copy)}.png"
    mask = np.array(Image.open(mask_path))
    mask[0, :3] = [11, 42, 11]
    Image.fromarray(mask).save(mask_path)
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, str(mask_path), "11, 42")


def test_image_mask_size_mismatch(tiny_copy, tmp_path, capsys):
    mask_path = tiny_copy / "masks" / f"{first_id(tiny_copy)}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask_path)
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, str(mask_path), "12x10")


def test_empty_split(tiny_copy, tmp_path, capsys):
    (tiny_copy / "splits" / "source_train.txt").write_text("\n")
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "source_train", "empty")


def test_missing_split(tiny_copy, tmp_path, capsys):
    (tiny_copy / "splits" / "target_val.txt").unlink()
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "target_val")


def test_unknown_device_value(tmp_path, capsys):
    code, err = run_cli(["pretrain", "--run", str(tmp_path / "r"), "--device", "tpu"], capsys)
    assert_one_line_error(code, err, "tpu")


def test_unknown_protocol(tiny_copy, tmp_path, capsys):
    code, err = run_cli(pretrain_args(tiny_copy, tmp_path / "run") + ["--protocol", "nope"], capsys)
    assert_one_line_error(code, err, "nope", "semi-1_16")


def test_bad_config_value_names_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train: {steps: -3}\n")
    code, err = run_cli(["pretrain", "--config", str(recipe), "--run", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, str(recipe), "train.steps")


def test_unknown_set_key(tmp_path, capsys):
    code, err = run_cli(["pretrain", "--run", str(tmp_path / "r"), "--set", "train.nope=1"], capsys)
    assert_one_line_error(code, err, "train.nope")
