"""Devices, seeds and torch.distributed: the process-level set-up every stage shares."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

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


def setup(device: str) -> Runtime:
    """Pick the device and join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    dev = select_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Runtime(device=dev, rank=rank, world=world)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
