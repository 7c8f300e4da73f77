"""``--nproc N``: a command relaunches itself in N processes under torch's elastic launcher.

``labelpipe evaluate --run R --nproc 2`` runs what ``torchrun --standalone --nproc_per_node 2 -m
labelpipe -- evaluate --run R`` runs, with ``torch.distributed.run`` called from Python: on CPU N
processes join a gloo group, on CUDA each process takes one local GPU (``LOCAL_RANK``) and NCCL.
The ``--`` keeps the launcher's argparse from reading labelpipe's ``--run`` as an abbreviation of its
own ``--run-path`` (the "ambiguous option" error of a plain ``torchrun ... labelpipe evaluate --run``).
Inside the launched processes ``WORLD_SIZE`` is set, so they run the command instead of launching again.
"""

from __future__ import annotations

import os

import torch

from labelpipe.errors import LabelpipeError


def under_launcher() -> bool:
    """True inside processes started by torchrun or ``--nproc`` (they join a process group)."""
    return "WORLD_SIZE" in os.environ


def resolve_nproc(value: str, device: str) -> int:
    """``--nproc`` as a process count: a positive integer, or ``gpus`` for every local GPU.

    On CUDA (``--device cuda``, or ``auto`` with a GPU visible) each process needs a GPU of its own.
    """
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if on_cuda else 0
    if value == "gpus":
        if gpus == 0:
            raise LabelpipeError("--nproc gpus: no CUDA device is visible; give a number of CPU processes")
        return gpus
    try:
        n = int(value)
    except ValueError as exc:
        raise LabelpipeError(f"--nproc {value}: expected a number of processes or 'gpus'") from exc
    if n < 1:
        raise LabelpipeError(f"--nproc {value}: must be at least 1")
    if on_cuda and n > gpus:
        raise LabelpipeError(
            f"--nproc {n}: only {gpus} CUDA device(s) visible and each process takes one; "
            f"use --nproc {gpus} (or --device cpu for CPU processes)"
        )
    return n


def strip_nproc(args: list[str]) -> list[str]:
    """The command line without ``--nproc N`` / ``--nproc=N`` (what each launched process runs)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(args: list[str], nproc: int) -> int:
    """Run ``labelpipe ARGS`` in ``nproc`` local processes (elastic launch, standalone rendezvous on a free
    port); returns 0, or the exit status of the first process that failed (it has printed its error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    launcher = parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "labelpipe", "--", *strip_nproc(args)])
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores (torch's launcher would set 1, with a warning)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(launcher)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0
