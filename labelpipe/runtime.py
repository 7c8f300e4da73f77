"""Devices, seeds and torch.distributed: the process-level set-up every stage shares."""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labelpipe.errors import LabelpipeError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def select_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LabelpipeError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name == "auto":
        return select_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    raise LabelpipeError(f"--device {name}: unknown device; use auto, cpu or cuda")


def place(model: torch.nn.Module, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """``model`` moved to ``device``; with ``channels_last`` its 4-d weights NHWC, so that its convolutions run
    NHWC kernels (a convolution's output follows its weight's layout, the inputs need not be converted).

    Measured on the 2-core CPU (``benchmarks/train_throughput.py --layouts nhwc,nchw``): the EfficientNet-Lite
    scales train 1.2-1.5x and infer 1.4-1.5x faster NHWC (depthwise convolutions), ResNet-18 infers 1.14x faster
    and trains at the same speed (0.96x); on CUDA NHWC is what AMP's tensor-core kernels want. ``model.safetensors`` is
    written contiguous either way (``save_model``), so a file does not depend on the layout it was trained in.
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def setup(device: str) -> Runtime:
    """Pick the device and join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    dev = select_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend)
        # Leave the group on every exit path (success, the CLI's one-line errors, sys.exit), as torch asks;
        # torchrun stops the other ranks when one exits with an error.
        atexit.register(shutdown)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Runtime(device=dev, rank=rank, world=world)


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA where supported (fp16 otherwise); a no-op on CPU (which trains in float32)."""
    if device.type != "cuda" or not enabled:
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under ``torch.compile`` and DDP wrappers (in any nesting): what to save and load.

    ``torch.compile`` keeps the module as ``_orig_mod`` and DDP as ``module``; their own ``state_dict``
    prefixes every key with that name, which a plain model could not load.
    """
    while True:
        if isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed); a collective."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def _collective_device(x: torch.Tensor) -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes CPU (and CUDA) tensors."""
    if torch.distributed.get_backend() == "nccl" and x.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks, as a new tensor on ``x``'s device (``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    t = x.detach().to(_collective_device(x), copy=True)
    torch.distributed.all_reduce(t)
    return t.to(x.device)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order: ``(n_r, ...)`` per rank -> ``(sum_r n_r, ...)``.

    The ``n_r`` may differ (zero included); the trailing dimensions and dtype must be the same on
    every rank. Every rank must call it (it is a collective). Works on gloo and NCCL; no gradient
    flows through it. Returns ``x`` unchanged when not distributed.
    """
    if not is_distributed():
        return x
    world = torch.distributed.get_world_size()
    dev = _collective_device(x)
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    rows = max(sizes)
    if rows == 0:
        return x.detach().clone()
    # Pad to the longest share: all_gather moves equal shapes only. bool travels as uint8, which every
    # backend moves.
    wire = torch.uint8 if x.dtype == torch.bool else x.dtype
    padded = torch.zeros((rows, *x.shape[1:]), dtype=wire, device=dev)
    padded[: x.shape[0]] = x.detach().to(dev, wire)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]).to(x.device, x.dtype)
