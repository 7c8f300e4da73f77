"""evaluate: metrics.json contract, plots, the latest model by default, sliding windows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from labelpipe.inference import predict_logits
from labelpipe.models import build_model
from tests.conftest import run_cli


@pytest.mark.slow
def test_evaluate_writes_metrics_and_plots(pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    assert run_cli(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    out = run / "evaluate" / "pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"miou", "per_class_iou", "pixel_accuracy", "tail_miou", "ece"} <= set(metrics)
    assert len(metrics["per_class_iou"]) == 11 and metrics["split"] == "target_test"
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["ece"] <= 1
    for png in ("per_class.png", "confusion.png", "samples.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "digit-9" in printed


@pytest.mark.slow
def test_evaluate_other_split_and_unknown_model(pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    assert run_cli(["evaluate", "--run", str(run), "--split", "target_val", "--device", "cpu"]) == 0
    assert json.loads((run / "evaluate/pretrain/metrics.json").read_text())["split"] == "target_val"
    assert run_cli(["evaluate", "--run", str(run), "--model", "round-7"]) == 2
    assert "round-7" in capsys.readouterr().err


def test_evaluate_without_a_model_says_what_to_run(data_cache, tmp_path, capsys):
    assert run_cli(["evaluate", "--run", str(tmp_path / "empty"), "--set", "data.digitscapes.size=tiny"]) == 2
    assert "labelpipe pretrain" in capsys.readouterr().err


def test_sliding_window_matches_whole_image_for_a_translation_equivariant_model():
    torch.manual_seed(0)

    class PixelModel(torch.nn.Module):  # 1x1 conv: windows must stitch back to the whole-image output
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x, with_rep=True):
            from labelpipe.models import SegmentationOutput

            y = self.conv(x)
            return SegmentationOutput(main=y, aux=2 * y, rep=y if with_rep else None)

    model = PixelModel().eval()
    image = torch.randn(2, 3, 50, 70)
    whole_main, whole_aux = predict_logits(model, image, crop=200)
    tiled_main, tiled_aux = predict_logits(model, image, crop=24)
    assert torch.allclose(whole_main, tiled_main, atol=1e-5)
    assert torch.allclose(whole_aux, tiled_aux, atol=1e-5)


def test_sliding_window_covers_every_pixel_of_a_real_model():
    model = build_model(3, "resnet18", 16, (1, 2, 3)).eval()
    main_logits, _ = predict_logits(model, torch.randn(1, 3, 80, 100), crop=64)
    assert main_logits.shape == (1, 3, 80, 100) and torch.isfinite(main_logits).all()
