"""export: TorchScript / ONNX files of the main head that reproduce PyTorch's logits, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from labelpipe.context import load_run_model
from labelpipe.errors import LabelpipeError
from labelpipe.stages.export import run_export


@pytest.fixture()
def run_copy(pretrained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(pretrained_run, dst)
    return dst


def reference_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    _, model, _ = load_run_model(run, None)
    with torch.no_grad():
        return model(x).main


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated in torch 2.9+
@pytest.mark.slow
def test_torchscript_export_loads_and_matches_pytorch(run_copy):
    path = run_export(run_copy, "torchscript", None, None, "cpu")
    assert path == run_copy / "export" / "pretrain.pt"
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    loaded = torch.jit.load(str(path))
    for shape in [(1, 3, 32, 32), (3, 3, 40, 56)]:  # batch, height and width are not frozen
        x = torch.randn(shape)
        with torch.no_grad():
            got = loaded(x)
        expected = reference_logits(run_copy, x)
        assert got.shape == expected.shape == (shape[0], expected.shape[1], shape[2], shape[3])
        assert torch.allclose(got, expected, atol=1e-4)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["format"] == "torchscript" and info["model"] == "pretrain"
    assert len(info["classes"]) == info["num_classes"] == got.shape[1]
    assert info["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert info["input"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert 0.0 <= info["check"]["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_export_via_cli_honours_out(run_copy, tmp_path, capsys):
    from labelpipe.cli import main

    out = tmp_path / "deploy" / "seg.pt"
    with pytest.raises(SystemExit) as info:
        main(["export", str(run_copy), "--format", "torchscript", "--model", "pretrain", "--out", str(out)])
        raise SystemExit(0)
    assert info.value.code == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert str(out) in capsys.readouterr().out


@pytest.mark.slow
def test_onnx_export_matches_pytorch_in_onnxruntime(run_copy):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = run_export(run_copy, "onnx", None, None, "cpu")
    assert path == run_copy / "export" / "pretrain.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 48, 40)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), reference_logits(run_copy, x), atol=1e-4)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["check"]["runtime"].startswith("onnxruntime")
    assert info["check"]["max_abs_diff"] <= 1e-4


def test_export_of_a_run_without_a_model_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelpipeError, match="no trained model"):
        run_export(tmp_path / "empty", "torchscript", None, None, "cpu")


def test_unknown_format_is_a_one_line_error_from_the_cli(run_copy, capsys):
    from labelpipe.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", str(run_copy), "--format", "tflite"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --format tflite: unknown format") and "\n" not in err
    assert not (run_copy / "export").exists()
