"""The one training loop that ``pretrain`` and ``selftrain`` share.

A stage passes in what differs: where batches come from, the objective (a function from a batch
to a loss), extra stateful components (EMA teacher, memory banks, prototypes) and a hook after
each optimizer step. The loop owns the optimizer, the poly LR schedule, AMP, checkpoints,
resume, logging and validation.

Under torchrun every rank runs this loop on its share of each global batch (DDP averages the
gradients); rank 0 alone writes the checkpoint, the log and TensorBoard, and shows the progress.
Logged losses are means over ranks; validation numbers are the same on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from labelpipe.config import TrainConfig
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.runtime import Runtime, all_gather_objects, all_reduce_sum, autocast, unwrap
from labelpipe.store.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with the backbone at ``lr`` and the decoder and heads at ``decoder_lr_mult * lr``."""
    module = unwrap(model)
    backbone, head = module.parameter_groups()
    groups = [{"params": backbone, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.decoder_lr_mult}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(it: int, total: int, power: float, warmup: int = 0, warmup_start: float = 0.1) -> float:
    """Poly decay ``(1 - it / total) ** power`` (ALGORITHMS.md section 4), after an optional linear warm-up
    from ``warmup_start`` to 1 over the first ``warmup`` steps (the rectification authors' schedule)."""
    if it < warmup:
        return warmup_start + (1.0 - warmup_start) * it / warmup
    return max(0.0, 1 - it / total) ** power


def poly_schedule(
    optimizer: torch.optim.Optimizer, total: int, power: float, warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr = lr_0 * lr_factor(it)``; ``total`` is the poly horizon (``train.schedule_steps``, default the steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, power, warmup))


@dataclass
class TrainJob:
    """Everything one training run needs; see :func:`train`."""

    stage_dir: Path
    model: torch.nn.Module
    total_steps: int
    batches: Callable[[int], Iterator[Any]]  # start step -> iterator of per-step batches
    objective: Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]  # same log keys on every rank
    cfg: TrainConfig
    runtime: Runtime
    fingerprint: str
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    extras: dict[str, Stateful] = field(default_factory=dict)
    after_step: Callable[[int], None] | None = None
    description: str = "train"
    # Extra per-round numbers for curves.png (self-training: kept fraction, pseudo-label precision).
    curve_rounds: Callable[[], list[dict[str, Any]]] | None = None


def _first(rng: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's RNG state of a checkpoint (a run resumed with another number of processes)."""
    return rng[0] if isinstance(rng, list) else rng


def _read_log(path: Path, until_step: int) -> list[str]:
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= until_step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill
    return keep


def _tensorboard(stage_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(stage_dir / "tensorboard"))


def _mean_over_ranks(loss: torch.Tensor, logs: dict[str, Any], world: int) -> tuple[float, dict[str, Any]]:
    """The loss and the numeric logs averaged over the ranks (one all-reduce; a no-op on one process)."""
    if world == 1:
        return float(loss.detach()), logs
    keys = [k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    values = torch.tensor([float(loss.detach()), *(float(logs[k]) for k in keys)], dtype=torch.float64)
    values = all_reduce_sum(values) / world
    return float(values[0]), {**logs, **{k: float(v) for k, v in zip(keys, values[1:].tolist(), strict=True)}}


def _sync_buffers(module: torch.nn.Module, rt: Runtime) -> None:
    """Rank 0's BatchNorm statistics on every rank, as DDP's next forward would broadcast them.

    Each rank updates its running statistics on its own images in the forward pass, so between two
    forwards they differ (without SyncBatchNorm); validation and the saved model use rank 0's.
    """
    if not rt.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer.data)
    for buffers in by_dtype.values():  # one broadcast per dtype, not one per BatchNorm layer
        flat = torch.cat([b.reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, 0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def _refresh_curves(job: TrainJob) -> None:
    """Redraw ``curves.png`` from ``log.jsonl`` (rank 0). A figure that cannot be drawn must not stop
    a training run: it is reported and the run goes on."""
    from labelpipe.training.curves import write_curves

    try:
        write_curves(job.stage_dir, job.curve_rounds() if job.curve_rounds else None, job.description)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"note: {job.stage_dir / 'curves.png'} not drawn ({type(exc).__name__}: {exc})")


class _StopRequest:
    """Ctrl-C during training: the first SIGINT asks the loop to stop after the current step (which then
    saves a checkpoint, so the run resumes exactly there); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def _stop_on_sigint(enabled: bool):
    """Install :class:`_StopRequest` for SIGINT (main thread, one process only: under torchrun the ranks
    would stop at different steps, so there the default KeyboardInterrupt stays)."""
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter and floating buffer (BatchNorm statistics) is finite (one device sync)."""
    state = unwrap(model).state_dict().values()
    flags = [torch.isfinite(t).all() for t in state if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _diverged(job: TrainJob, what: str, step: int, last_good: int | None, ckpt_path: Path) -> LabelpipeError:
    """The one-line error for a loss (or weights) that became NaN or infinite at ``step`` (1-based)."""
    setting = "selftrain.lr" if job.description.startswith("round") else "train.lr"
    kept = (
        f"the last good checkpoint ({ckpt_path}, step {last_good}) is kept"
        if last_good is not None
        else "no checkpoint had been written yet"
    )
    return LabelpipeError(
        f"{job.description}: {what} at step {step}; training stopped there and {kept}; lower the learning "
        f"rate (now {job.cfg.lr:g}; e.g. --set {setting}={job.cfg.lr / 10:g})"
    )


def _test_kill_after_step(done: int) -> None:
    """Test hook: ``LABELPIPE_TEST_KILL_AFTER_STEP=k`` SIGKILLs this process right after step k (and its
    checkpoint, when step k writes one), so the kill/resume tests kill at a known point instead of racing
    a polling loop against the process."""
    kill_at = os.environ.get("LABELPIPE_TEST_KILL_AFTER_STEP")
    if kill_at and done == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def train(job: TrainJob) -> dict[str, Any]:
    """Run (or resume) training to ``total_steps``; returns the last validation metrics.

    Rank 0 redraws ``curves.png`` after every validation and at the end.
    """
    cfg, rt, model = job.cfg, job.runtime, job.model
    ckpt_path = job.stage_dir / "checkpoint.pt"
    optimizer = build_optimizer(model, cfg)
    horizon = cfg.schedule_steps or job.total_steps
    if horizon < job.total_steps:
        raise LabelpipeError(
            f"train.schedule_steps={horizon} is shorter than the {job.total_steps} steps to train: the poly "
            "schedule would reach zero first; raise it or leave it unset (= the steps)"
        )
    scheduler = poly_schedule(optimizer, horizon, cfg.poly_power, cfg.warmup_steps)
    use_amp = cfg.amp and rt.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())

    if rt.distributed and rt.rank > 0:
        # Each rank its own stream for dropout and the like (rank 0 keeps the one-process stream);
        # the model was built from the common seed before, and DDP starts every rank from rank 0's weights.
        torch.manual_seed(torch.initial_seed() + 7919 * rt.rank)
    start, last_val = 0, {}
    last_good: int | None = None  # the step of the last checkpoint known to hold finite weights
    state = load_checkpoint(ckpt_path)
    if state is not None and state.get("fingerprint") == job.fingerprint:
        module = unwrap(model)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for name, component in job.extras.items():
            component.load_state_dict(state["extras"][name])
        rng = state["rng"]  # one state per rank under DDP (a list), else one
        set_rng_state(rng[rt.rank] if isinstance(rng, list) and len(rng) == rt.world else _first(rng))
        start, last_val = state["step"], state.get("last_val", {})
        last_good = start
        if rt.is_main and start < job.total_steps:
            print(f"resuming {job.description} from step {start} ({ckpt_path})")

    log_path = job.stage_dir / "log.jsonl"
    log_file = None
    if rt.is_main:  # drop records past the checkpoint we resume from, then append live
        kept = _read_log(log_path, start)
        log_path.write_text("".join(line + "\n" for line in kept))
        log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed below
    writer = _tensorboard(job.stage_dir, rt.is_main)

    def log(record: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")

    def checkpoint(step: int) -> None:
        nonlocal last_good
        if not _weights_finite(model):  # never overwrite the last good checkpoint with diverged weights
            raise _diverged(job, "the weights became NaN or infinite", step, last_good, ckpt_path)
        rngs = all_gather_objects(rng_state())  # a collective: every rank, before rank 0 alone writes
        if not rt.is_main:
            return
        module = unwrap(model)
        save_checkpoint(
            ckpt_path,
            {
                "fingerprint": job.fingerprint,
                "step": step,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "extras": {k: v.state_dict() for k, v in job.extras.items()},
                "rng": rngs if rt.distributed else rngs[0],
                "last_val": last_val,
            },
        )
        last_good = step

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not rt.is_main,
    )
    model.train()
    t_last, n_images = time.time(), 0
    curves_at = None  # the step curves.png was last drawn at
    with progress, _stop_on_sigint(not rt.distributed) as stop:
        task = progress.add_task(job.description, total=job.total_steps, completed=start, info="")
        for step, batch in zip(range(start, job.total_steps), job.batches(start), strict=False):
            with autocast(rt.device, use_amp):
                loss, logs = job.objective(batch, step)
            loss_now = float(loss.detach())
            if not math.isfinite(loss_now):  # stop before the update spreads it into the weights
                raise _diverged(job, f"the loss is {loss_now}", step + 1, last_good, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if job.after_step is not None:
                _sync_buffers(model, rt)  # an EMA teacher copies them: the same teacher on every rank
                job.after_step(step)
            n_images += logs.pop("images", 0)
            done = step + 1
            if done % cfg.log_every == 0 or done == job.total_steps:
                elapsed = time.time() - t_last
                loss_value, logs = _mean_over_ranks(loss, logs, rt.world)
                record = {
                    "step": done,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": round(n_images / max(elapsed, 1e-9), 2),
                    **logs,
                }
                t_last, n_images = time.time(), 0
                log(record)
                if writer is not None:
                    for key, value in record.items():
                        if key != "step" and isinstance(value, (int, float)):
                            writer.add_scalar(f"train/{key}", value, done)
                progress.update(task, info=f"loss {record['loss']:.3f}")
            if job.validate is not None and (done % cfg.val_every == 0 or done == job.total_steps):
                if not _weights_finite(model):
                    raise _diverged(job, "the weights became NaN or infinite", done, last_good, ckpt_path)
                _sync_buffers(model, rt)
                last_val = job.validate(model)
                model.train()
                log({"step": done, **{f"val_{k}": v for k, v in last_val.items()}})
                if rt.is_main:
                    _refresh_curves(job)
                    curves_at = done
                if writer is not None:
                    for key, value in last_val.items():
                        writer.add_scalar(f"val/{key}", value, done)
                progress.update(task, info=f"loss {float(loss.detach()):.3f} val mIoU {last_val.get('miou', 0):.3f}")
            if done % cfg.checkpoint_every == 0 or done == job.total_steps or stop.requested:
                checkpoint(done)
            _test_kill_after_step(done)
            progress.update(task, completed=done)
            if stop.requested:
                if log_file is not None:
                    log_file.close()
                raise Interrupted(
                    f"{job.description}: interrupted at step {done} of {job.total_steps}; checkpoint saved to "
                    f"{ckpt_path}; run the same command again to resume"
                )
    _sync_buffers(model, rt)  # every rank ends with the weights rank 0 saves
    if log_file is not None:
        log_file.close()
        if curves_at != job.total_steps or not (job.stage_dir / "curves.png").is_file():
            _refresh_curves(job)
    if writer is not None:
        writer.close()
    return last_val
