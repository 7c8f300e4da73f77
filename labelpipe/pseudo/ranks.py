"""The processes labelling one prediction store, without torch: one process needs nothing; under
torchrun (WORLD_SIZE > 1) a process group is joined and the few collectives the labelling uses (a sum
of counts, a gather of small objects, a barrier) go through it. torch is imported only then."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ones labelling one store: ``rank`` of ``world``. Duck-types the
    ``rank`` / ``world`` / ``is_main`` of ``labelpipe.runtime.Runtime`` without importing torch."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_ranks() -> Ranks:
    """One process: ``Ranks()``, torch untouched. Under torchrun (WORLD_SIZE > 1): join the process group
    (gloo; the histograms and counts are CPU arrays) and return this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    from labelpipe.runtime import setup

    runtime = setup("cpu")
    return Ranks(runtime.rank, runtime.world)


def sum_across(ranks: Ranks, array: np.ndarray) -> np.ndarray:
    """The element-wise sum of ``array`` (int64 or float64) over every rank; ``array`` itself with one."""
    if ranks.world <= 1:
        return array
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.distributed.get_backend() == "nccl":  # a group joined by a GPU stage moves CUDA tensors only
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().numpy()


def gather(ranks: Ranks, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` with one)."""
    if ranks.world <= 1:
        return [obj]
    from labelpipe.runtime import all_gather_objects

    return all_gather_objects(obj)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing with one)."""
    if ranks.world > 1:
        from labelpipe.runtime import barrier as group_barrier

        group_barrier()


def shard_of(n_images: int, ranks: Ranks) -> range:
    """The contiguous images of this rank: ``[n * rank / world, n * (rank + 1) / world)``."""
    return range(n_images * ranks.rank // ranks.world, n_images * (ranks.rank + 1) // ranks.world)
