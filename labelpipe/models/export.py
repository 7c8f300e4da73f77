"""A model's main head as one deployable file: TorchScript (traced) or ONNX (``torch.export``), each
loaded back and run on random batches to compare it with eager PyTorch (``labelpipe export``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labelpipe.errors import LabelpipeError


class MainHead(nn.Module):
    """``model(x).main``: (B, 3, H, W) normalised images -> (B, C, H, W) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image, with_rep=False).main


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    """The largest |a - b| of the exported model's output ``a`` and eager PyTorch's ``b`` (same shape)."""
    a = torch.as_tensor(a).float().cpu()
    b = b.float().cpu()
    if a.shape != b.shape:
        raise LabelpipeError(
            f"exported model gives shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}; report this as a bug"
        )
    return float((a - b).abs().max())


def export_torchscript(wrapper: nn.Module, tmp: Path, shapes, device: torch.device) -> tuple[float, str]:
    """Trace ``wrapper`` at ``shapes[0]`` into ``tmp``, load it back and run it on random batches of every
    shape: (max |diff| against eager PyTorch, what ran the check)."""
    example = torch.randn(shapes[0], device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic is traced as ops
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what was asked for.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(tmp), map_location=device)
    diff = 0.0
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, device=device)
            diff = max(diff, max_abs_diff(loaded(x), wrapper(x)))
    return diff, "torch.jit.load"


def export_onnx(wrapper: nn.Module, tmp: Path, shapes, device: torch.device) -> tuple[float | None, str | None]:
    """Export ``wrapper`` to ONNX (batch, height and width dynamic) into ``tmp`` and check it with onnxruntime
    where installed: (max |diff| against eager PyTorch, what ran the check), or (None, None) unchecked."""
    example = torch.randn(shapes[0], device=device)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"image": dims},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except ImportError as exc:
        raise LabelpipeError(
            f"--format onnx needs the onnx and onnxscript packages ({exc}); pip install 'labelpipe[export]'"
        ) from exc
    try:
        import onnxruntime
    except ImportError:
        print(
            "export: onnxruntime is not installed; the ONNX file was NOT run to check it "
            "(pip install onnxruntime to check)"
        )
        return None, None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    diff = 0.0
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, device=device)
            (out,) = session.run(None, {input_name: x.cpu().numpy()})
            diff = max(diff, max_abs_diff(out, wrapper(x)))
    return diff, f"onnxruntime {onnxruntime.__version__}"
