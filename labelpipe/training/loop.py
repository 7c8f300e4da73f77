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
    # Pause after this many steps (validated and checkpointed there; the poly schedule still spans
    # ``total_steps``), so that a later call with ``stop_at=None`` continues the very same run.
    stop_at: int | None = None


def _first(rng: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's RNG state of a checkpoint (a run resumed with another number of processes)."""
    return rng[0] if isinstance(rng, list) else rng


def read_log(path: Path, until_step: int) -> list[str]:
    """The lines of a run's ``log.jsonl`` up to ``until_step`` (none past a torn last line)."""
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


def _test_kill_after_step(done: int) -> None:
    """Test hook: ``LABELPIPE_TEST_KILL_AFTER_STEP=k`` SIGKILLs this process right after step k (and its
    checkpoint, when step k writes one), so the kill/resume tests kill at a known point instead of racing
    a polling loop against the process."""
    kill_at = os.environ.get("LABELPIPE_TEST_KILL_AFTER_STEP")
    if kill_at and done == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Optimization:
    """What a step updates and a checkpoint saves besides the weights: the optimizer, its poly LR schedule
    and the AMP gradient scaler (which only scales when AMP runs in float16: CUDA without bfloat16)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool

    @classmethod
    def build(cls, job: TrainJob) -> _Optimization:
        """The optimizer, schedule and scaler of ``job``; refuses a poly horizon shorter than the run."""
        cfg = job.cfg
        optimizer = build_optimizer(job.model, cfg)
        horizon = cfg.schedule_steps or job.total_steps
        if horizon < job.total_steps:
            raise LabelpipeError(
                f"train.schedule_steps={horizon} is shorter than the {job.total_steps} steps to train: the poly "
                "schedule would reach zero first; raise it or leave it unset (= the steps)"
            )
        scheduler = poly_schedule(optimizer, horizon, cfg.poly_power, cfg.warmup_steps)
        use_amp = cfg.amp and job.runtime.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
        return cls(optimizer, scheduler, scaler, use_amp)

    def update(self, loss: torch.Tensor) -> None:
        """Backward through the (scaled) loss, one optimizer step, one schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        """The backbone's learning rate now (the decoder's is ``decoder_lr_mult`` times it)."""
        return self.scheduler.get_last_lr()[0]


class _Checkpoints:
    """``checkpoint.pt`` of a run: resume from it, write it (never with diverged weights), and remember the
    step of the last one known to hold finite weights, which the divergence error names."""

    def __init__(self, job: TrainJob, opt: _Optimization) -> None:
        self.job, self.opt = job, opt
        self.path = job.stage_dir / "checkpoint.pt"
        self.last_good: int | None = None

    def resume(self) -> tuple[int, dict[str, Any]]:
        """Restore everything a checkpoint of this fingerprint holds (weights, optimizer, schedule, scaler,
        extras, RNG streams); returns the step to start from and the last validation metrics, ``(0, {})``
        without one (or with one of other settings, which the run then overwrites)."""
        job, rt = self.job, self.job.runtime
        state = load_checkpoint(self.path)
        if state is None or state.get("fingerprint") != job.fingerprint:
            return 0, {}
        unwrap(job.model).load_state_dict(state["model"])
        self.opt.optimizer.load_state_dict(state["optimizer"])
        self.opt.scheduler.load_state_dict(state["scheduler"])
        self.opt.scaler.load_state_dict(state["scaler"])
        for name, component in job.extras.items():
            component.load_state_dict(state["extras"][name])
        rng = state["rng"]  # one state per rank under DDP (a list), else one
        set_rng_state(rng[rt.rank] if isinstance(rng, list) and len(rng) == rt.world else _first(rng))
        start = self.last_good = state["step"]
        if rt.is_main and start < job.total_steps:
            print(f"resuming {job.description} from step {start} ({self.path})")
        return start, state.get("last_val", {})

    def save(self, step: int, last_val: dict[str, Any]) -> None:
        """Write the checkpoint after ``step`` steps (rank 0; every rank must call: the RNG states are gathered)."""
        job, rt = self.job, self.job.runtime
        if not _weights_finite(job.model):  # never overwrite the last good checkpoint with diverged weights
            raise self.diverged("the weights became NaN or infinite", step)
        rngs = all_gather_objects(rng_state())  # a collective: every rank, before rank 0 alone writes
        if not rt.is_main:
            return
        save_checkpoint(
            self.path,
            {
                "fingerprint": job.fingerprint,
                "step": step,
                "model": unwrap(job.model).state_dict(),
                "optimizer": self.opt.optimizer.state_dict(),
                "scheduler": self.opt.scheduler.state_dict(),
                "scaler": self.opt.scaler.state_dict(),
                "extras": {k: v.state_dict() for k, v in job.extras.items()},
                "rng": rngs if rt.distributed else rngs[0],
                "last_val": last_val,
            },
        )
        self.last_good = step

    def diverged(self, what: str, step: int) -> LabelpipeError:
        """The one-line error for a loss (or weights) that became NaN or infinite at ``step`` (1-based)."""
        job = self.job
        setting = "selftrain.lr" if job.description.startswith("round") else "train.lr"
        kept = (
            f"the last good checkpoint ({self.path}, step {self.last_good}) is kept"
            if self.last_good is not None
            else "no checkpoint had been written yet"
        )
        return LabelpipeError(
            f"{job.description}: {what} at step {step}; training stopped there and {kept}; lower the learning "
            f"rate (now {job.cfg.lr:g}; e.g. --set {setting}={job.cfg.lr / 10:g})"
        )


class _RunRecords:
    """What a run leaves to read (rank 0): ``log.jsonl`` (cut back to the step it resumes from, then
    appended live), TensorBoard scalars and ``curves.png``. Every rank calls it: the logged train numbers
    are averaged over the ranks first."""

    def __init__(self, job: TrainJob, start: int) -> None:
        self.job = job
        self.log_file = None
        if job.runtime.is_main:  # drop records past the checkpoint we resume from, then append live
            log_path = job.stage_dir / "log.jsonl"
            kept = read_log(log_path, start)
            log_path.write_text("".join(line + "\n" for line in kept))
            self.log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed by close()
        self.writer = _tensorboard(job.stage_dir, job.runtime.is_main)
        self.t_last, self.n_images = time.time(), 0  # throughput since the last train record
        self.curves_at: int | None = None  # the step curves.png was last drawn at

    def count_images(self, n: int) -> None:
        """``n`` more images trained on (this rank's), for the throughput of the next train record."""
        self.n_images += n

    def _write(self, record: dict[str, Any]) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")

    def train(self, step: int, loss: torch.Tensor, logs: dict[str, Any], lr: float) -> dict[str, Any]:
        """The train record of ``step``: loss and logs as means over the ranks, the LR, images per second."""
        elapsed = time.time() - self.t_last
        loss_value, logs = _mean_over_ranks(loss, logs, self.job.runtime.world)
        record = {
            "step": step,
            "loss": loss_value,
            "lr": lr,
            "images_per_s": round(self.n_images / max(elapsed, 1e-9), 2),
            **logs,
        }
        self.t_last, self.n_images = time.time(), 0
        self._write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        return record

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        """The validation record of ``step``; rank 0 redraws ``curves.png`` with it."""
        self._write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        if self.job.runtime.is_main:
            _refresh_curves(self.job)
            self.curves_at = step
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, step)

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def finish(self, last_step: int) -> None:
        """At the end of the run (or a pause after ``last_step``): the final curves (unless the last
        validation drew them) and TensorBoard."""
        if self.job.runtime.is_main:
            self.close()
            if self.curves_at != last_step or not (self.job.stage_dir / "curves.png").is_file():
                _refresh_curves(self.job)
        if self.writer is not None:
            self.writer.close()


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _seed_rank(rt: Runtime) -> None:
    """Each rank its own stream for dropout and the like (rank 0 keeps the one-process stream); the model
    was built from the common seed before, and DDP starts every rank from rank 0's weights."""
    if rt.distributed and rt.rank > 0:
        torch.manual_seed(torch.initial_seed() + 7919 * rt.rank)


def _optimizer_step(
    job: TrainJob, opt: _Optimization, ckpt: _Checkpoints, batch: Any, step: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Step ``step`` (0-based): the objective under autocast, a stop before a non-finite loss reaches the
    weights, the update, then the stage's after-step hook (e.g. the EMA teacher)."""
    with autocast(job.runtime.device, opt.use_amp):
        loss, logs = job.objective(batch, step)
    loss_now = float(loss.detach())
    if not math.isfinite(loss_now):  # stop before the update spreads it into the weights
        raise ckpt.diverged(f"the loss is {loss_now}", step + 1)
    opt.update(loss)
    if job.after_step is not None:
        _sync_buffers(job.model, job.runtime)  # an EMA teacher copies them: the same teacher on every rank
        job.after_step(step)
    return loss, logs


def _validate(job: TrainJob, ckpt: _Checkpoints, records: _RunRecords, step: int) -> dict[str, float]:
    """Validate the model after ``step`` steps (rank 0's BatchNorm statistics on every rank) and record it."""
    if not _weights_finite(job.model):
        raise ckpt.diverged("the weights became NaN or infinite", step)
    _sync_buffers(job.model, job.runtime)
    assert job.validate is not None
    metrics = job.validate(job.model)
    job.model.train()
    records.validation(step, metrics)
    return metrics


def train(job: TrainJob) -> dict[str, Any]:
    """Run (or resume) training to ``total_steps`` (or to ``stop_at``, a pause); returns the last validation metrics.

    Every ``log_every`` steps a train record, every ``val_every`` a validation (rank 0 redraws
    ``curves.png`` after each and at the end), every ``checkpoint_every`` a checkpoint. A first Ctrl-C
    stops after the current step with a checkpoint (:class:`Interrupted`, exit 130); a non-finite loss
    or weights stop the run with a one-line error naming the last good checkpoint.
    """
    cfg, model, total = job.cfg, job.model, job.total_steps
    end = total if job.stop_at is None else min(job.stop_at, total)  # this call's last step
    opt = _Optimization.build(job)
    _seed_rank(job.runtime)  # before the resume, which restores each rank's stream
    ckpt = _Checkpoints(job, opt)
    start, last_val = ckpt.resume()
    if start >= end and end < total:
        return last_val  # already paused there (or past it): nothing to train before the pause
    records = _RunRecords(job, start)
    progress = _progress_bar(job.runtime.is_main)
    model.train()
    with progress, _stop_on_sigint(not job.runtime.distributed) as stop:
        task = progress.add_task(job.description, total=total, completed=start, info="")
        for step, batch in zip(range(start, end), job.batches(start), strict=False):
            loss, logs = _optimizer_step(job, opt, ckpt, batch, step)
            records.count_images(logs.pop("images", 0))
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                record = records.train(done, loss, logs, opt.lr)
                progress.update(task, info=f"loss {record['loss']:.3f}")
            if job.validate is not None and (done % cfg.val_every == 0 or done == end):
                last_val = _validate(job, ckpt, records, done)
                progress.update(task, info=f"loss {float(loss.detach()):.3f} val mIoU {last_val.get('miou', 0):.3f}")
            if done % cfg.checkpoint_every == 0 or done == end or stop.requested:
                ckpt.save(done, last_val)
            _test_kill_after_step(done)
            progress.update(task, completed=done)
            if stop.requested:
                records.close()
                raise Interrupted(
                    f"{job.description}: interrupted at step {done} of {total}; checkpoint saved to "
                    f"{ckpt.path}; run the same command again to resume"
                )
    _sync_buffers(model, job.runtime)  # every rank ends with the weights rank 0 saves
    records.finish(end)
    return last_val
