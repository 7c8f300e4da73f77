"""Training checkpoints (full state) and shareable model weights (safetensors).

A checkpoint holds everything a resumed run needs to continue the same trajectory: model,
optimizer, LR schedule, AMP scaler, extra components (EMA teacher, memory banks, prototypes),
the step and every RNG state. Weights for users go to ``model.safetensors`` with the model's
config and class names in its metadata, so the file describes itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file

from labelpipe.errors import LabelpipeError
from labelpipe.store.atomic import atomic_path


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, ints, floats and strings only, so checkpoints load with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it takes on disk, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, size_hint=_tensor_bytes(state)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when there is none).

    Loaded with ``weights_only=True``: torch's restricted unpickler builds tensors, containers and
    primitives only, so a planted pickle (``__reduce__`` -> ``os.system``) is refused, never run.
    """
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LabelpipeError(
            f"{path}: checkpoint is unreadable or holds more than tensors ({reason[:200]}); "
            "delete it or rerun with --force"
        ) from exc


def save_model(path: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, size_hint=_tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata={"labelpipe": json.dumps(metadata, default=str)})


def read_model_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LabelpipeError(f"{path}: model file not found; run `labelpipe pretrain` for this run first")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return json.loads(meta.get("labelpipe", "{}"))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, JSONDecodeError: all "corrupt"
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> LabelpipeError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    stage = "pretrain" if Path(path).parent.name == "pretrain" else "selftrain"
    return LabelpipeError(
        f"{path}: not a readable safetensors model ({reason}); rebuild it with `labelpipe {stage} --force` on its run"
    )


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise _unreadable(path, exc) from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LabelpipeError(
            f"{path}: weights do not fit the configured model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
            "evaluate with the model config the weights were trained with"
        )
