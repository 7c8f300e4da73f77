"""The GPU check: labelpipe's CUDA paths run for real, in one call of under 8 minutes on one GPU.

Every CUDA branch of labelpipe (AMP bf16 / fp16 with the gradient scaler, channels_last, cudnn.benchmark,
pinned memory and loader workers, SyncBatchNorm, ``torch.compile`` with inductor) was written without a
GPU. This script is what to run the first time one is available:

1. ``tests``: ``pytest -m cuda`` (tests/test_cuda_paths.py and any other test marked ``cuda``) on the GPU.
2. ``recipes``: ``labelpipe pretrain`` and one ``selftrain`` round with every self-training feature on
   (EMA teacher, contrastive, rectified, denoising, CutMix) of the DigitScapes recipes, at ``--steps``
   steps, in AMP bf16, in fp32 and with ``train.compile=default``; one pretrain run is SIGKILLed once
   its log.jsonl shows step ``--kill-at`` and resumed, and checked against the uninterrupted run of the
   same setting: the resume starts from a checkpoint (not step 0), every step is logged exactly once,
   and the loss after the resume continues the uninterrupted curve (on a GPU not bit-identical:
   cudnn.benchmark and atomics; compared within ``--loss-tol``).
3. ``memory``: peak GPU memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) of one
   steady-state training step per recipe, stage, precision and per-GPU batch of the README's table, beside
   the estimate of benchmarks/gpu_memory.py (its ``Trainee`` step, run here on CUDA tensors; its
   ``measure`` for the estimate) and the relative error. The measured step runs the real
   ``u2pl_contrastive`` where the estimate runs a worst-case stand-in (gpu_memory.py's docstring).
4. ``throughput``: training and inference images/s of ResNet-101 OS8 at 512 and 769 crops and of the
   CPU-scale model (stages/demo.yaml's), labelpipe against a bare PyTorch loop of the same model
   (same optimizer, bf16 autocast, channels_last, data already on the GPU). Training: ``labelpipe
   pretrain`` on a synthetic folder data set of crop-sized PNGs (loader, augmentation, loop, logging:
   what a user gets), read from its log.jsonl; inference: ``labelpipe.inference.predict_logits`` on the
   same GPU batch. Goal: labelpipe within 10 % of the bare loop.
5. ``pseudolabel``: ``labelpipe pseudolabel`` on a store of ``--maps`` (500) Cityscapes-size synthetic
   maps (19 x 1024 x 2048): wall time and peak RSS of the fresh process. The store comes from
   benchmarks/pseudolabel.py (imported, not copied); it runs in the background while the GPU sections run.

Output under ``--out`` (default ``$OUT``): gpu_check.md (a summary table, one row per check, then a table
per section), gpu_check.json (every figure), logs.tar.gz (each command's output; three files, since the
device tool brings back at most 8 from $OUT). Runs, data and the store go
to ``--work`` (default: a temporary folder, deleted at the end unless ``--keep-work``; a given one is
kept). ``--budget-s`` (440) is shared out between the sections (BUDGET_SHARES, time one leaves goes to
the next); an item past its section's share is skipped and listed as such. Exit status 0 when every
check passed, 1 otherwise.

Without CUDA it prints "no CUDA device: nothing to check" and exits 0; ``--cpu-dry-run`` runs every
section at tiny sizes on the CPU instead (bf16 autocast is CUDA-only in labelpipe, so it trains fp32 and
compiles with the eager backend), which exercises this script's own code, not the GPU.

    python benchmarks/gpu_check.py --out DIR                      # on the GPU machine, all sections
    python benchmarks/gpu_check.py --out DIR --sections memory throughput --steps 60
    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gc     # on a laptop: the script's own check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SECTIONS = ("tests", "recipes", "memory", "throughput", "pseudolabel")
NO_CUDA = "no CUDA device: nothing to check"
GIB, MIB = 2**30, 2**20
# Every self-training feature of one round (the "teacher, contrastive, rectified, denoise, CutMix").
SELFTRAIN_FLAGS = ["--rounds", "1", "--pseudo-source", "teacher", "--contrastive", "--rectified", "--denoise"]
SELFTRAIN_FLAGS += ["--strong-aug"]
# Throughput models: (label, backbone, output stride, ASPP rates, crop, per-GPU batch). The CPU-scale
# model is read from stages/demo.yaml at run time.
R101 = ("resnet101", 8, (12, 24, 36))
NUM_CLASSES = 19
OVERHEAD_GOAL = 0.10
# Shares of --budget-s per section (the pseudolabel section runs in the background meanwhile). A section
# past its share skips its remaining items and says so in the report; rerun it alone with --sections.
BUDGET_SHARES = {"tests": 0.28, "recipes": 0.36, "memory": 0.20, "throughput": 0.16}


# ---------------------------------------------------------------------------------------------------
# Plumbing


def load_module(name: str, path: Path):
    """A benchmark script as a module (benchmarks/ is not a package); registered in sys.modules, where
    dataclasses look their module up."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_first(*candidates: tuple[str, str]) -> Any:
    """The first ``module.attribute`` that imports: labelpipe's training loop and inference helpers are
    being moved into packages of their own; this script works before and after."""
    errors = []
    for module, attribute in candidates:
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}.{attribute}: {exc}")
    raise ImportError("; ".join(errors))


@dataclass
class Check:
    """One row of the summary table: what was checked, the figure, and whether it passed."""

    section: str
    name: str
    ok: bool | None  # None: informational or skipped
    detail: str


@dataclass
class Context:
    out: Path
    work: Path
    dry: bool
    args: argparse.Namespace
    deadline: float  # time.monotonic() after which remaining items are skipped
    checks: list[Check] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    data_build: subprocess.Popen | None = None  # building the recipes' data sets in the background

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, section: str, name: str, ok: bool | None, detail: str) -> bool:
        self.checks.append(Check(section, name, ok, detail))
        mark = {True: "ok", False: "FAIL", None: "--"}[ok]
        print(f"  [{mark}] {section}: {name}: {detail}", flush=True)
        return bool(ok)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("LABELPIPE_DATA", str(self.work / "data"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.dry:
            env["OMP_NUM_THREADS"] = "1"
        return env


def labelpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelpipe", *args]


def run_logged(ctx: Context, cmd: list[str], log_name: str, timeout: float | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` with its output in logs/LOG_NAME.log; (exit status, seconds, last lines of output)."""
    log = ctx.out / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = max(5.0, ctx.left()) if timeout is None else timeout
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ctx.env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - start
    return rc, seconds, tail(log)


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:])[-300:]


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def read_log(path: Path) -> list[dict[str, Any]]:
    """The training records (with a loss) of a log.jsonl; validation records and torn lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            out.append(record)
    return out


def window_mean(records: list[dict[str, Any]], first: int, last: int) -> float:
    """Mean loss of the records with first <= step <= last (NaN when there are none)."""
    values = [r["loss"] for r in records if first <= r["step"] <= last]
    return statistics.fmean(values) if values else math.nan


# ---------------------------------------------------------------------------------------------------
# 1. pytest -m cuda


def section_tests(ctx: Context) -> None:
    xml = ctx.out / "logs" / "pytest_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += ctx.args.pytest_args or [str(ROOT / "tests")]
    rc, seconds, last = run_logged(ctx, cmd, "pytest_cuda", timeout=min(ctx.left(), ctx.args.tests_timeout))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.raw["tests"] = {"exit": rc, "seconds": seconds, **counts, "passed": passed}
    summary = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    # pytest exits 5 when every cuda test was deselected (none marked); 0 when all selected passed or skipped.
    ok = rc == 0 and counts["tests"] > 0 and (ctx.dry or passed > 0)
    ctx.check("tests", "pytest -m cuda", ok, f"{summary} in {seconds:.0f} s (exit {rc}){'' if ok else ': ' + last}")
    ctx.tables["tests"] = markdown(
        ["selected", "passed", "failed", "skipped", "seconds"],
        [[counts["tests"], passed, counts["failures"] + counts["errors"], counts["skipped"], f"{seconds:.0f}"]],
    )


# ---------------------------------------------------------------------------------------------------
# 2. pretrain + one selftrain round, three precisions, kill and resume


def digitscapes_recipes() -> list[Path]:
    """stages/*.yaml that train on DigitScapes (no data root), except the seconds-long tiny.yaml."""
    from labelpipe.config import resolve_config

    found = []
    for path in sorted((ROOT / "stages").glob("*.yaml")):
        if path.name == "tiny.yaml":
            continue
        try:
            config = resolve_config(None, recipe=path)
        except Exception:  # noqa: BLE001 - a recipe another check reports
            continue
        if config.data.root is None and "pretrain" in config.pipeline:
            found.append(path)
    return found


def variant_sets(ctx: Context) -> dict[str, list[str]]:
    """--set options per variant. labelpipe's AMP is CUDA-only: on the CPU "bf16" would train fp32."""
    compile_sets = ["--set", "train.compile=default"]
    if ctx.dry:  # inductor needs minutes on a CPU; the eager backend takes the same code path in labelpipe
        compile_sets += ["--set", "train.compile_backend=eager"]
    variants = {"bf16": ["--set", "train.amp=true"], "fp32": ["--set", "train.amp=false"], "compile": compile_sets}
    return {name: variants[name] for name in ctx.args.variants}


def run_checks(stage_dir: Path, steps: int) -> tuple[bool, str]:
    """A finished training run: model saved, steps 1..N logged once each, every loss finite."""
    records = read_log(stage_dir / "log.jsonl")
    logged = [r["step"] for r in records]
    problems = []
    if logged != list(range(1, steps + 1)):
        problems.append(f"logged steps {logged[:3]}...{logged[-3:]} (expected 1..{steps})")
    if not all(math.isfinite(r["loss"]) for r in records):
        problems.append("non-finite loss")
    if not (stage_dir / "model.safetensors").is_file():
        problems.append("no model.safetensors")
    first = records[0]["loss"] if records else math.nan
    last = records[-1]["loss"] if records else math.nan
    return not problems, "; ".join(problems) or f"loss {first:.3f} -> {last:.3f}"


def kill_after_step(
    cmd: list[str], log: Path, step: int, env: dict[str, str], output: Path, timeout: float
) -> tuple[int | None, int]:
    """Start ``cmd``, SIGKILL it as soon as ``log`` (a log.jsonl) holds a record of ``step`` or later.

    Returns (the last step logged before the kill, the exit status: -9 when killed; 0 means the run ended
    before the trigger). Deterministic in what it waits for: the kill comes after step ``step`` was
    logged; how many more steps the process makes before the signal lands varies (a few milliseconds).
    """
    with open(output, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        end = time.monotonic() + timeout
        seen = None
        while proc.poll() is None and time.monotonic() < end:
            records = read_log(log)
            if records and records[-1]["step"] >= step:
                seen = records[-1]["step"]
                os.killpg(proc.pid, signal.SIGKILL)  # its loader workers too
                break
            time.sleep(0.01)
        else:
            if proc.poll() is None:  # timed out
                os.killpg(proc.pid, signal.SIGKILL)
        return seen, proc.wait()


def recipe_paths(ctx: Context) -> list[Path]:
    if ctx.args.recipes:
        return [Path(r) for r in ctx.args.recipes]
    return [ROOT / "stages" / "tiny.yaml"] if ctx.dry else digitscapes_recipes()


def build_data_worker(recipes: list[str]) -> None:
    """Open each recipe's data set as a stage does (labelpipe.data.open_source), which builds DigitScapes on
    first use: done in the background while the tests run, so the recipe runs do not wait for it."""
    from labelpipe.config import resolve_config
    from labelpipe.data import open_source

    for recipe in recipes:
        data = resolve_config(None, recipe=Path(recipe)).data
        start = time.perf_counter()
        open_source(data.root, data.kind, data.digitscapes.model_dump(), default_root=data.resolved_root())
        print(f"{recipe}: data ready in {time.perf_counter() - start:.0f} s", flush=True)


def section_recipes(ctx: Context) -> None:
    a = ctx.args
    recipes = recipe_paths(ctx)
    if ctx.data_build is not None:  # started in the background at the beginning
        try:
            ctx.data_build.wait(timeout=max(1.0, ctx.left() - 60))
        except subprocess.TimeoutExpired:
            ctx.check("recipes", "data build", False, "DigitScapes was not built in time")
            return
        if ctx.data_build.returncode != 0:
            ctx.check("recipes", "data build", False, tail(ctx.out / "logs" / "data-build.log"))
            return
    steps, st_steps = a.steps, a.selftrain_steps or max(2, a.steps // 2)
    kill_at = a.kill_at or max(1, steps // 2)
    rows, raw = [], {}
    for recipe in recipes:
        common = ["--config", str(recipe), "--device", ctx.device, "--set", f"train.steps={steps}"]
        common += ["--set", "train.log_every=1", "--set", f"train.val_every={steps}"]
        common += ["--set", f"train.checkpoint_every={max(1, kill_at // 2)}", "--set", "train.val_limit=64"]
        curves: dict[str, list[dict[str, Any]]] = {}
        for variant, sets in variant_sets(ctx).items():
            run = ctx.work / "runs" / f"{recipe.stem}-{variant}"
            for stage, extra in (("pretrain", []), ("selftrain", [*SELFTRAIN_FLAGS, "--steps", str(st_steps)])):
                name = f"{recipe.stem} {stage} {variant}"
                if ctx.left() < 30:
                    ctx.check("recipes", name, None, "skipped: time budget")
                    continue
                cmd = labelpipe_cmd(stage, "--run", str(run), *common, *sets, *extra)
                rc, seconds, last = run_logged(ctx, cmd, f"{recipe.stem}-{stage}-{variant}")
                stage_dir = run / "pretrain" if stage == "pretrain" else run / "selftrain" / "round-1" / "train"
                n = steps if stage == "pretrain" else st_steps
                ok, detail = run_checks(stage_dir, n) if rc == 0 else (False, f"exit {rc}: {last}")
                records = read_log(stage_dir / "log.jsonl")
                if stage == "pretrain":
                    curves[variant] = records
                ips = [r["images_per_s"] for r in records[2:] if "images_per_s" in r]
                raw[name] = {"exit": rc, "seconds": seconds, "losses": [r["loss"] for r in records]}
                speed = f"{statistics.median(ips):.0f}" if ips else "-"
                rows.append([recipe.stem, stage, variant, "ok" if ok else "FAIL", f"{seconds:.0f}", speed, detail])
                ctx.check("recipes", name, ok, f"{detail} ({seconds:.0f} s)")
                if stage == "pretrain" and not ok:
                    break  # no selftrain without its pretrained model
        kill_variant = next(iter(variant_sets(ctx)))
        if kill_variant in curves and ctx.left() > 60:
            raw[f"{recipe.stem} kill/resume"] = kill_and_resume(
                ctx, recipe, common, variant_sets(ctx)[kill_variant], kill_variant, curves[kill_variant], kill_at
            )
    ctx.raw["recipes"] = raw
    headers = ["recipe", "stage", "variant", "result", "seconds", "img/s (log median)", "detail"]
    ctx.tables["recipes"] = (
        f"{ctx.args.steps} pretrain steps, {st_steps} selftrain steps ({' '.join(SELFTRAIN_FLAGS)}), "
        f"device {ctx.device}.\n\n" + markdown(headers, rows)
    )


def kill_and_resume(
    ctx: Context,
    recipe: Path,
    common: list[str],
    sets: list[str],
    variant: str,
    reference: list[dict[str, Any]],
    kill_at: int,
) -> dict[str, Any]:
    """SIGKILL a pretrain run after step ``kill_at``, resume it, compare with the uninterrupted ``reference``."""
    steps = ctx.args.steps
    run = ctx.work / "runs" / f"{recipe.stem}-{variant}-killed"
    cmd = labelpipe_cmd("pretrain", "--run", str(run), *common, *sets)
    log = run / "pretrain" / "log.jsonl"
    name = f"{recipe.stem} pretrain {variant}: SIGKILL after step {kill_at}, resume"
    output = ctx.out / "logs" / f"{recipe.stem}-killed.log"
    seen, status = kill_after_step(cmd, log, kill_at, ctx.env(), output, timeout=max(30.0, ctx.left() - 30))
    result: dict[str, Any] = {"killed_after_logged_step": seen, "exit_at_kill": status}
    if seen is None:
        ctx.check("recipes", name, False, f"the run ended (exit {status}) before step {kill_at}: {tail(output)}")
        return result
    rc, seconds, last = run_logged(ctx, cmd, f"{recipe.stem}-resumed")
    text = (ctx.out / "logs" / f"{recipe.stem}-resumed.log").read_text(errors="replace")
    resumed_from = None
    for line in text.splitlines():
        if line.startswith("resuming pretrain from step "):
            resumed_from = int(line.split()[4])
    records = read_log(log)
    logged = [r["step"] for r in records]
    # The loss right after the resume against the uninterrupted run's over the same steps, and against its
    # first steps: a resume that silently restarted from scratch is close to the latter.
    start = resumed_from or 0
    width = max(3, steps // 10)
    after = window_mean(records, start + 1, start + width)
    same = window_mean(reference, start + 1, start + width)
    initial = window_mean(reference, 1, width)
    final, final_ref = window_mean(records, steps - width + 1, steps), window_mean(reference, steps - width + 1, steps)
    result.update(
        resumed_from=resumed_from,
        exit=rc,
        seconds=seconds,
        logged_steps_ok=logged == list(range(1, steps + 1)),
        loss_after_resume=after,
        reference_same_steps=same,
        reference_first_steps=initial,
        final_window=final,
        reference_final_window=final_ref,
    )
    problems = []
    if rc != 0:
        problems.append(f"resume exited {rc}: {last}")
    if resumed_from is None or not 0 < resumed_from <= seen:
        problems.append(f"resumed from {resumed_from}, expected a checkpoint in (0, {seen}]")
    if logged != list(range(1, steps + 1)):
        problems.append(f"steps logged {len(logged)} ({len(set(logged))} distinct), expected 1..{steps} once each")
    rel = abs(after - same) / max(abs(same), 1e-8)
    if not rel <= ctx.args.loss_tol:
        problems.append(
            f"loss after resume {after:.3f} vs {same:.3f} uninterrupted ({rel:.0%} > {ctx.args.loss_tol:.0%})"
        )
    if not abs(after - same) < abs(after - initial):
        problems.append(f"loss after resume {after:.3f} is nearer the first steps' {initial:.3f}: a restart?")
    detail = "; ".join(problems) or (
        f"killed after step {seen}, resumed from {resumed_from}; loss over steps {start + 1}-{start + width} "
        f"{after:.3f} vs {same:.3f} uninterrupted (first steps {initial:.3f}); final {final:.3f} vs {final_ref:.3f}"
    )
    ctx.check("recipes", name, not problems, detail)
    return result


# ---------------------------------------------------------------------------------------------------
# 3. Peak GPU memory against benchmarks/gpu_memory.py's estimate


def gpu_memory_module():
    return load_module("gpu_memory", BENCH / "gpu_memory.py")


def memory_settings(ctx: Context) -> list[tuple[str, str, int, str, int]]:
    """(recipe, stage, per-GPU batch, precision, GPUs) of the README table: gpu_memory.py's own selection
    (its recipes; per-GPU batches 2, 4, 8 below the recipe batch and the recipe batch), both precisions."""
    gm = gpu_memory_module()
    if ctx.dry:  # gpu_memory's validation setting: resnet18 OS16, crop 64, 19 classes
        return [("small", stage, 2, precision, 1) for stage in ("pretrain", "selftrain") for precision in ("fp32",)]
    out = []
    for recipe in ctx.args.memory_recipes or gm.DEFAULT_RECIPES:
        setting = gm.load_setting(recipe)
        batch = setting.config.train.batch_size
        per_gpu = sorted({b for b in gm.PER_GPU_BATCHES if b < batch} | {batch})
        for stage in setting.stages:
            for precision in ctx.args.precisions:
                out += [(recipe, stage, b, precision, max(1, batch // b)) for b in per_gpu]
    # Smallest per-GPU batch of every recipe first: when the time budget runs out, what is left unmeasured
    # is the largest batches, not whole recipes.
    return sorted(out, key=lambda s: s[2])


def load_memory_setting(recipe: str, stage: str):
    gm = gpu_memory_module()
    return gm.small_setting(stage) if recipe == "small" else gm.load_setting(recipe)


def estimate_worker(recipe: str, stage: str, batch: int, precision: str, world: int) -> tuple[int, int, float]:
    """gpu_memory.py's fake-tensor estimate in bytes: (one process, the README's with DDP for ``world`` GPUs, s).

    Runs in a worker process (CPU work); the measured step on the GPU has no DDP, so the figure to compare
    with it is the one-process one.
    """
    import torch

    torch.set_num_threads(1)
    gm = gpu_memory_module()
    setting = load_memory_setting(recipe, stage)
    est = gm.measure(setting, stage, batch, precision == "bf16", world=world)
    ddp = 0
    if world > 1:  # gpu_memory adds DDP's gradient buckets (one copy of the trainable gradients) for world > 1
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            ddp = gm.Trainee(setting, stage, batch, False, real_contrastive=False).grad_bytes()
    return est.peak - ddp, est.peak, est.seconds


def device_trainee(gm, device: Any) -> type:
    """gpu_memory.py's ``Trainee`` whose step runs on ``device`` (CUDA: with CUDA autocast).

    The Trainee draws its batch with torch.randn / randint / rand; a TorchFunctionMode sends those calls
    (only those made in gpu_memory.py itself, and not those with a generator) to ``device``, so labelpipe's
    own functions (CutMix, the contrastive loss) run as they do in a CUDA run. The step is the Trainee's
    with CUDA autocast (bf16) in place of its CPU one. Build it under ``with torch.device(device)``.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.randn, torch.randint, torch.rand, torch.zeros, torch.ones, torch.empty, torch.full}

    class InputsOnDevice(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            caller = sys._getframe(1).f_globals.get("__name__")
            if func in factories and caller == gm.__name__ and "device" not in kwargs and "generator" not in kwargs:
                kwargs["device"] = device
            return func(*args, **kwargs)

    class DeviceTrainee(gm.Trainee):
        @contextlib.contextmanager
        def autocast(self):
            with InputsOnDevice(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                yield

    return DeviceTrainee


def measure_cuda_step(recipe: str, stage: str, batch: int, precision: str) -> dict[str, Any]:
    """Peak CUDA memory of gpu_memory.py's steady-state step (its Trainee, see :func:`device_trainee`)."""
    import torch

    from labelpipe.runtime import setup

    gm = gpu_memory_module()
    device = setup("cuda").device  # as every labelpipe stage: the device, cudnn.benchmark on
    CudaTrainee = device_trainee(gm, device)  # noqa: N806 - a class
    setting = load_memory_setting(recipe, stage)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    trainee = None
    try:
        with torch.device(device):  # weights, teacher, memory bank, prototypes built on the GPU
            torch.manual_seed(0)
            trainee = CudaTrainee(setting, stage, batch, precision == "bf16", real_contrastive=True)
        trainee.student.to(memory_format=torch.channels_last)  # as labelpipe's for_training on CUDA
        if trainee.teacher is not None:
            trainee.teacher.model.to(memory_format=torch.channels_last)
        trainee.step(0)  # warm-up: gradients and optimizer state exist from here on, as in gpu_memory.py
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainee.step(1)
        torch.cuda.synchronize()
        return {
            "allocated": torch.cuda.max_memory_allocated() - base,
            "reserved": torch.cuda.max_memory_reserved(),
            "step_s": time.perf_counter() - start,
        }
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"out of memory ({str(exc).splitlines()[0][:120]})"}
    finally:
        del trainee
        gc.collect()
        torch.cuda.empty_cache()


def measure_cpu_step(recipe: str, stage: str, batch: int, precision: str) -> dict[str, Any]:
    """Dry run: the same step on real CPU tensors, peak from the CPU allocator's events (gpu_memory.py's
    independent check); there is no reserved figure on the CPU."""
    gm = gpu_memory_module()
    setting = load_memory_setting(recipe, stage)
    real = gm.measure(setting, stage, batch, precision == "bf16", fake=False, tracker=False)
    return {"allocated": real.peak, "reserved": None, "step_s": real.seconds}


def section_memory(ctx: Context) -> None:
    settings = memory_settings(ctx)
    # The estimates are CPU work (fake tensors): they run in worker processes while the GPU measures.
    workers = 0 if ctx.dry else max(1, min(len(settings), (os.cpu_count() or 2) - 2))
    # spawn, not fork: this process has initialised CUDA, which a forked child must not inherit.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers else None
    submit = pool.submit if pool else (lambda fn, *a: _Done(fn(*a)))
    futures = [submit(estimate_worker, *s) for s in settings]
    rows, raw = [], []
    measure = measure_cpu_step if ctx.dry else measure_cuda_step
    scale, unit = (MIB, "MiB") if ctx.dry else (GIB, "GiB")  # the dry run's tiny steps read in MiB

    def mem(value: float | None) -> str:
        return "-" if value is None else f"{value / scale:.2f}"

    try:
        for (recipe, stage, batch, precision, world), future in zip(settings, futures, strict=True):
            name = f"{recipe} {stage} {precision} b={batch}"
            if ctx.left() < 20:
                ctx.check("memory", name, None, "skipped: time budget")
                continue
            measured = measure(recipe, stage, batch, precision)
            try:
                est_alone, est_table, est_s = future.result(timeout=max(1.0, ctx.left()))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                est_alone = est_table = None
                measured.setdefault("estimate_error", f"{type(exc).__name__}: {exc}")
            entry = {
                "recipe": recipe,
                "stage": stage,
                "precision": precision,
                "per_gpu_batch": batch,
                "gpus_in_table": world,
                "estimate_one_gpu": est_alone,
                "estimate_table": est_table,
                **measured,
            }
            raw.append(entry)
            if "error" in measured or est_alone is None:
                reason = measured.get("error") or measured.get("estimate_error")
                rows.append([recipe, stage, precision, batch, mem(est_table), mem(est_alone), "-", "-", "-", reason])
                # An out-of-memory row is a finding (the table says what does not fit), not a failure.
                ctx.check("memory", name, None if "out of memory" in str(reason) else False, str(reason))
                continue
            err = est_alone / measured["allocated"] - 1
            planned = est_alone * 1.15 + 0.5 * GIB  # README's advice: total x 1.15 + 0.5 GiB
            reserved = measured["reserved"]
            note = "" if reserved is None else ("within the plan" if reserved + 0.5 * GIB <= planned else "OVER plan")
            rows.append(
                [
                    recipe,
                    stage,
                    precision,
                    batch,
                    mem(est_table),
                    mem(est_alone),
                    mem(measured["allocated"]),
                    mem(reserved),
                    f"{err:+.1%}",
                    note,
                ]
            )
            ok = abs(err) <= ctx.args.memory_tol
            ctx.check("memory", name, ok, f"estimate {err:+.1%} vs measured {mem(measured['allocated'])} {unit}")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    ctx.raw["memory"] = raw
    headers = ["recipe", "stage", "precision", "per-GPU batch", f"README estimate {unit} (DDP)"]
    headers += [f"estimate {unit} (1 GPU)", f"max allocated {unit}", f"max reserved {unit}", "estimate error", "note"]
    ctx.tables["memory"] = (
        'Peak of one steady-state training step (gpu_memory.py\'s step), one process. "estimate error" = '
        'estimate (1 GPU) / max allocated - 1. "plan" = README\'s total x 1.15 + 0.5 GiB against reserved + '
        "0.5 GiB of CUDA context. The README estimate adds DDP's gradient buckets for b < the recipe batch.\n\n"
        + markdown(headers, rows)
    )


class _Done:
    """A finished future (the dry run computes the estimates inline)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


# ---------------------------------------------------------------------------------------------------
# 4. Throughput: labelpipe against a bare PyTorch loop


@dataclass(frozen=True)
class ThroughputModel:
    label: str
    backbone: str
    output_stride: int
    aspp_rates: tuple[int, ...]
    crop: int
    batch: int
    aux_weight: float = 0.4
    scale: str | None = None  # None: DeepLabv3+; n / s / m: the light FPN decoder (model.scale)
    rep_dim: int = 256


def throughput_models(ctx: Context) -> list[ThroughputModel]:
    from labelpipe.config import resolve_config

    demo = resolve_config(None, recipe=ROOT / "stages" / "demo.yaml")
    m, t = demo.model, demo.train
    if ctx.dry:
        return [ThroughputModel("tiny resnet18 OS16", "resnet18", 16, (1, 2, 3), 32, 2)]
    cpu_scale = ThroughputModel(
        f"CPU-scale: {m.backbone} OS{m.output_stride}{f' scale {m.scale}' if m.scale else ''} (demo.yaml)",
        m.backbone,
        m.output_stride,
        tuple(m.aspp_rates),
        t.crop_size or 64,
        t.batch_size,
        t.aux_weight,
        m.scale,
        m.rep_dim,
    )
    b = ctx.args.r101_batch
    return [
        ThroughputModel("ResNet-101 OS8, 512", *R101, 512, b),
        ThroughputModel("ResNet-101 OS8, 769", *R101, 769, b),
        cpu_scale,
    ]


def synthetic_folder(root: Path, size: int, images: int) -> Path:
    """A folder data set of ``images`` random size x size PNGs with 19-class masks (train) and 2 val ones."""
    import numpy as np
    from PIL import Image

    from labelpipe.data.folder import default_palette, write_dataset_yaml

    if (root / "dataset.yaml").is_file():
        return root
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Smooth images (a few random gradients) decode and compress like photographs, not like noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ids = [f"img{i:04d}" for i in range(images + 2)]
    for i in ids:
        a = rng.uniform(-1, 1, (3, 3))
        rgb = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] * xx * yy for c in range(3)], -1)
        rgb = ((rgb - rgb.min()) / (np.ptp(rgb) + 1e-6) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{i}.png", compress_level=1)
        mask = ((xx * 4).astype(np.uint8) * 4 + (yy * 4).astype(np.uint8) + rng.integers(0, 3)) % NUM_CLASSES
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    (root / "splits" / "train.txt").write_text("\n".join(ids[:images]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[images:]) + "\n")
    protocol = {"labeled": "train", "unlabeled": "train", "val": "val", "test": "val"}
    write_dataset_yaml(
        root,
        name=f"synthetic-{size}",
        classes=[f"c{i}" for i in range(NUM_CLASSES)],
        palette=default_palette(NUM_CLASSES),
        protocols={"bench": protocol},
        default_protocol="bench",
    )
    return root


def bare_throughput(model_spec: ThroughputModel, device_name: str, warmup: int, steps: int) -> dict[str, float]:
    """img/s of a plain PyTorch training step and inference pass, plus labelpipe's predict_logits."""
    import torch
    import torch.nn.functional as F

    from labelpipe.models import build_model

    predict_logits = import_first(("labelpipe.inference", "predict_logits"))
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as labelpipe on CUDA (runtime.setup)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    m = model_spec
    model = build_model(NUM_CLASSES, m.backbone, m.output_stride, m.aspp_rates, m.rep_dim, scale=m.scale)
    model = model.to(device, memory_format=fmt)
    model.representation.requires_grad_(False)
    backbone, head = model.parameter_groups()
    optimizer = torch.optim.SGD([{"params": backbone}, {"params": head, "lr": 0.1}], lr=0.01, momentum=0.9)
    images = torch.randn(m.batch, 3, m.crop, m.crop, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (m.batch, m.crop, m.crop), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any]) -> float:
        times = []
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def train_step() -> None:
        with autocast:
            out = model(images, with_rep=False)
            loss = F.cross_entropy(out.main.float(), labels) + m.aux_weight * F.cross_entropy(out.aux.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_bare() -> None:
        with torch.no_grad(), autocast:
            model(images, with_rep=False)

    def infer_labelpipe() -> None:
        predict_logits(model, images, m.crop, amp=cuda)

    model.train()
    train_s = timed(train_step)
    model.eval()
    bare_s, lp_s = timed(infer_bare), timed(infer_labelpipe)
    return {"train_bare": m.batch / train_s, "infer_bare": m.batch / bare_s, "infer_labelpipe": m.batch / lp_s}


def section_throughput(ctx: Context) -> None:
    a = ctx.args
    warmup, steps = (1, 2) if ctx.dry else (3, a.throughput_steps)
    rows, raw = [], {}
    for spec in throughput_models(ctx):
        if ctx.left() < 45:
            ctx.check("throughput", spec.label, None, "skipped: time budget")
            continue
        bare = bare_throughput(spec, ctx.device, warmup, steps)
        # labelpipe pretrain, end to end, on crop-sized PNGs; throughput from its log (records after warm-up).
        images = max(2 * spec.batch, 8 if ctx.dry else 64)
        data = synthetic_folder(ctx.work / "throughput-data" / str(spec.crop), spec.crop, images)
        n = warmup + steps + 2 if ctx.dry else a.throughput_steps + 20
        run = ctx.work / "runs" / f"throughput-{spec.backbone}-{spec.crop}"
        sets = {
            "model.backbone": spec.backbone,
            "model.output_stride": spec.output_stride,
            "model.aspp_rates": list(spec.aspp_rates),
            "model.scale": spec.scale,
            "model.rep_dim": spec.rep_dim,
            "train.crop_size": spec.crop,
            "train.batch_size": spec.batch,
            "train.steps": n,
            "train.val_every": n,
            "train.val_limit": 2,
            "train.checkpoint_every": n,
            "train.log_every": 1 if ctx.dry else 5,
            "train.aux_weight": spec.aux_weight,
        }
        cmd = labelpipe_cmd("pretrain", "--data", str(data), "--run", str(run), "--device", ctx.device)
        for key, value in sets.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        rc, seconds, last = run_logged(ctx, cmd, f"throughput-{spec.backbone}-{spec.crop}")
        records = read_log(run / "pretrain" / "log.jsonl")
        skip = 1 if ctx.dry else 2  # the first records hold start-up and cudnn.benchmark's search
        ips = [r["images_per_s"] for r in records[skip:] if r.get("images_per_s")]
        train_lp = statistics.median(ips) if rc == 0 and ips else None
        raw[spec.label] = {**bare, "train_labelpipe": train_lp, "exit": rc, "pretrain_seconds": seconds}
        train_gap = None if train_lp is None else 1 - train_lp / bare["train_bare"]
        infer_gap = 1 - bare["infer_labelpipe"] / bare["infer_bare"]
        rows.append(
            [
                spec.label,
                spec.batch,
                f"{bare['train_bare']:.1f}",
                "-" if train_lp is None else f"{train_lp:.1f}",
                "-" if train_gap is None else f"{train_gap:+.1%}",
                f"{bare['infer_bare']:.1f}",
                f"{bare['infer_labelpipe']:.1f}",
                f"{infer_gap:+.1%}",
            ]
        )
        if train_lp is None:
            ctx.check("throughput", f"{spec.label} train", False, f"labelpipe pretrain exit {rc}: {last}")
        else:
            ok = None if ctx.dry else train_gap <= OVERHEAD_GOAL  # the CPU dry run measures nothing useful
            detail = f"labelpipe {train_lp:.1f} vs bare {bare['train_bare']:.1f} img/s ({train_gap:+.1%} overhead)"
            ctx.check("throughput", f"{spec.label} train", ok, detail)
        ok = None if ctx.dry else infer_gap <= OVERHEAD_GOAL
        detail = f"labelpipe {bare['infer_labelpipe']:.1f} vs bare {bare['infer_bare']:.1f} img/s ({infer_gap:+.1%})"
        ctx.check("throughput", f"{spec.label} inference", ok, detail)
    ctx.raw["throughput"] = raw
    headers = ["model (crop)", "batch", "train bare img/s", "train labelpipe img/s", "overhead"]
    headers += ["infer bare img/s", "infer labelpipe img/s", "overhead"]
    precision = "bf16 autocast, channels_last" if not ctx.dry else "fp32 (CPU dry run)"
    ctx.tables["throughput"] = (
        f"{precision}; bare = the model in a plain loop on a batch already on the device (median of "
        f"{steps} steps after {warmup}); labelpipe train = `labelpipe pretrain` on crop-sized PNGs (loader, "
        "augmentation, loop; median of its log's images_per_s); labelpipe inference = predict_logits on "
        f"the same batch. Goal: overhead within {OVERHEAD_GOAL:.0%}.\n\n" + markdown(headers, rows)
    )


# ---------------------------------------------------------------------------------------------------
# 5. labelpipe pseudolabel on a store of Cityscapes-size synthetic maps (background process)


def pseudolabel_worker(work: Path, maps: int, distinct: int, height: int, width: int, out_json: Path) -> None:
    """Write a store of ``maps`` synthetic maps and time ``labelpipe pseudolabel --method dars`` on it.

    Everything comes from benchmarks/pseudolabel.py (imported): its ``write_store`` (synthetic softmax maps
    reduced by the public PredictionWriter), its ``labelpipe_command`` and its ``timed`` (wall and peak RSS
    of the fresh process). Its maps cost ~15 s each at 19 x 1024 x 2048 (the probabilities, then their
    reduction), too slow for 500 in this check's minutes: it writes ``--distinct-maps`` of them, and the
    store repeats their columns under 500 ids with the public writer (what DARS streams is the same
    amount of data; the content repeats).
    """
    result: dict[str, Any] = {"maps": maps, "height": height, "width": width, "method": "dars"}
    try:
        import numpy as np

        bench = load_module("pseudolabel_bench", BENCH / "pseudolabel.py")
        missing = [n for n in ("write_store", "labelpipe_command", "PRIOR") if not hasattr(bench, n)]
        if missing:
            raise RuntimeError(f"benchmarks/pseudolabel.py has no {', '.join(missing)}; update gpu_check.py")
        from labelpipe.store import PredictionStore, PredictionWriter

        distinct = max(1, min(maps, distinct))
        seed_store, store = work / "distinct.h5", work / "predictions.h5"
        start = time.perf_counter()
        bench.write_store(seed_store, distinct, height, width, "")
        result["distinct_maps"], result["distinct_seconds"] = distinct, time.perf_counter() - start
        source = PredictionStore(seed_store)
        columns = [source.read(image_id) for image_id in source.ids]
        source.close()
        with PredictionWriter(store, len(bench.PRIOR)) as writer:
            for i in range(maps):
                writer.add(f"city{i % 18}/map{i:05d}", **columns[i % distinct])
        result["store_seconds"] = time.perf_counter() - start
        result["store_bytes"] = store.stat().st_size
        prior = work / "prior.npy"
        np.save(prior, np.asarray(bench.PRIOR, np.float64))
        cmd = bench.labelpipe_command(store, work / "labels", prior)
        result["command"] = "labelpipe " + " ".join(map(str, cmd[3:])).replace(str(work), "WORK")
        if hasattr(bench, "timed") and Path(getattr(bench, "TIME", "/usr/bin/time")).exists():
            measured = bench.timed(cmd)  # GNU time's peak RSS of the command alone
            result.update(seconds=measured["wall_s"], peak_rss_mb=measured["rss_mb"], exit=0)
        else:  # no GNU time here: the child's own rusage
            start = time.perf_counter()
            with open(work / "pseudolabel.log", "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(proc.pid, 0)
            result.update(seconds=time.perf_counter() - start, exit=os.waitstatus_to_exitcode(status))
            result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
            if result["exit"] != 0:
                result["error"] = f"exit {result['exit']}: {tail(work / 'pseudolabel.log')}"
    except BaseException as exc:  # noqa: BLE001 - the parent reports it (timed() raises SystemExit)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-2000:]
    out_json.write_text(json.dumps(result, indent=1))


def start_pseudolabel(ctx: Context) -> subprocess.Popen:
    maps, distinct, (height, width) = (
        (3, 2, (64, 128)) if ctx.dry else (ctx.args.maps, ctx.args.distinct_maps, (1024, 2048))
    )
    work = ctx.work / "pseudolabel"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--pseudolabel-worker", str(work), str(maps), str(distinct), str(height)]
    cmd += [str(width), str(ctx.out / "logs" / "pseudolabel.json")]
    log = open(ctx.out / "logs" / "pseudolabel-worker.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ctx.env())


def finish_pseudolabel(ctx: Context, proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        ctx.check("pseudolabel", "labelpipe pseudolabel", False, "did not finish within the time budget")
        return
    path = ctx.out / "logs" / "pseudolabel.json"
    result = json.loads(path.read_text()) if path.is_file() else {"error": f"worker exited {proc.returncode}"}
    ctx.raw["pseudolabel"] = result
    maps = f"{result.get('maps')} x 19x{result.get('height')}x{result.get('width')}"
    if "error" in result:
        ok = False
        ctx.check("pseudolabel", f"labelpipe pseudolabel, {maps}", ok, result["error"].splitlines()[0])
        ctx.tables["pseudolabel"] = f"Not measured: {result['error'].splitlines()[0]}"
        return
    detail = f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB"
    ctx.check("pseudolabel", f"labelpipe pseudolabel, {maps}", result["exit"] == 0, detail)
    ctx.tables["pseudolabel"] = (
        f"`{result['command']}` in a fresh process (the GPU sections ran beside it).\n\n"
        + markdown(
            ["maps", "distinct maps", "store GB", "store build s", "pseudolabel wall s", "peak RSS MB"],
            [
                [
                    maps,
                    result["distinct_maps"],
                    f"{result['store_bytes'] / 1e9:.2f}",
                    f"{result['store_seconds']:.0f}",
                    f"{result['seconds']:.1f}",
                    f"{result['peak_rss_mb']:.0f}",
                ]
            ],
        )
    )


# ---------------------------------------------------------------------------------------------------
# Report and main


def environment(ctx: Context) -> dict[str, Any]:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if not ctx.dry:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def write_report(ctx: Context, env: dict[str, Any], seconds: float) -> Path:
    mark = {True: "ok", False: "**FAIL**", None: "-"}
    failed = sum(c.ok is False for c in ctx.checks)
    lines = [
        "# labelpipe GPU check" + (" (CPU dry run: exercises the script, measures nothing)" if ctx.dry else ""),
        "",
        ", ".join(f"{k}: {v}" for k, v in env.items()) + f"; wall {seconds:.0f} s.",
        "",
        f"{len(ctx.checks)} checks, {failed} failed.",
        "",
        markdown(
            ["section", "check", "result", "detail"], [[c.section, c.name, mark[c.ok], c.detail] for c in ctx.checks]
        ),
    ]
    for section in SECTIONS:
        if section in ctx.tables:
            lines += ["", f"## {section}", "", ctx.tables[section]]
    path = ctx.out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    raw = {"environment": env, "seconds": seconds, "checks": [c.__dict__ for c in ctx.checks], **ctx.raw}
    (ctx.out / "gpu_check.json").write_text(json.dumps(raw, indent=1, default=str))
    return path


def pack_logs(folder: Path, keep_bytes: int = 256 * 1024) -> Path:
    """logs/ -> logs.tar.gz (the last ``keep_bytes`` of each file): the device tool brings back at most 8
    files from $OUT, so the output is gpu_check.md, gpu_check.json and this archive."""
    import io
    import tarfile

    archive = folder.with_name("logs.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()[-keep_bytes:]
            info = tarfile.TarInfo(f"logs/{path.relative_to(folder)}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    shutil.rmtree(folder)
    return archive


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else /tmp/gpu_check)")
    p.add_argument("--work", type=Path, default=None, help="runs, data and the store (default: a temporary folder)")
    p.add_argument("--keep-work", action="store_true", help="do not delete --work at the end")
    p.add_argument("--cpu-dry-run", action="store_true", help="every section at tiny sizes on the CPU")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, default=440.0, help="wall-clock budget; items past it are skipped")
    p.add_argument("--steps", type=int, default=120, help="pretrain steps of the recipe runs")
    p.add_argument("--selftrain-steps", type=int, default=None, help="steps of the selftrain round (steps / 2)")
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL after this logged step (steps / 2)")
    p.add_argument("--loss-tol", type=float, default=0.25, help="loss after resume vs uninterrupted, relative")
    p.add_argument("--variants", nargs="+", choices=["bf16", "fp32", "compile"], default=None)
    p.add_argument("--recipes", nargs="+", default=None, help="recipe files (default: the DigitScapes ones)")
    p.add_argument("--memory-recipes", nargs="+", default=None, help="for the memory table (gpu_memory's)")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    p.add_argument("--memory-tol", type=float, default=0.15, help="estimate vs max allocated, relative")
    p.add_argument("--r101-batch", type=int, default=8, help="per-GPU batch of the ResNet-101 throughput runs")
    p.add_argument("--throughput-steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--maps", type=int, default=500, help="Cityscapes-size maps in the pseudolabel store")
    p.add_argument("--distinct-maps", type=int, default=4, help="of them generated (~15 s each); the rest repeat")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds for pytest -m cuda")
    p.add_argument("--pytest-args", nargs="+", default=None, help="what pytest -m cuda runs (default: tests/)")
    p.add_argument("--pseudolabel-worker", nargs=6, help=argparse.SUPPRESS)
    p.add_argument("--build-data-worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variants is None:  # bf16 is a no-op on the CPU (labelpipe's AMP is CUDA-only)
        args.variants = ["fp32", "compile"] if args.cpu_dry_run else ["bf16", "fp32", "compile"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Module is None")  # MemTracker's, on the EMA teacher
    if args.pseudolabel_worker:
        work, maps, distinct, height, width, out_json = args.pseudolabel_worker
        pseudolabel_worker(Path(work), int(maps), int(distinct), int(height), int(width), Path(out_json))
        return 0
    if args.build_data_worker:
        build_data_worker(args.build_data_worker)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(NO_CUDA)
        return 0
    dry = args.cpu_dry_run  # on a CUDA machine, --cpu-dry-run still runs on the CPU
    out = args.out or Path(os.environ.get("OUT") or "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    if dry:
        torch.set_num_threads(1)  # a laptop or CI machine: the runs it starts use one thread too
    started = time.monotonic()
    end = started + args.budget_s
    ctx = Context(out=out, work=work, dry=dry, args=args, deadline=end)
    env = environment(ctx)
    print(f"GPU check{' (CPU dry run)' if dry else ''}: {env.get('gpu', 'cpu')}; output in {out}", flush=True)
    background = start_pseudolabel(ctx) if "pseudolabel" in args.sections else None
    if "recipes" in args.sections:
        cmd = [sys.executable, __file__, "--build-data-worker", *map(str, recipe_paths(ctx))]
        log = open(out / "logs" / "data-build.log", "w")  # noqa: SIM115 - closed with the process
        ctx.data_build = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ctx.env())
    steps: dict[str, Callable[[Context], None]] = {
        "tests": section_tests,
        "recipes": section_recipes,
        "memory": section_memory,
        "throughput": section_throughput,
    }
    try:
        for name in SECTIONS:
            if name not in args.sections or name not in steps:
                continue
            print(f"== {name}", flush=True)
            t0 = time.monotonic()
            # This section's share of what is left, so that time a section did not use goes to the next ones.
            later = [n for n in SECTIONS[SECTIONS.index(name) :] if n in args.sections and n in BUDGET_SHARES]
            share = BUDGET_SHARES[name] / sum(BUDGET_SHARES[n] for n in later)
            ctx.deadline = t0 + share * max(0.0, end - t0)
            try:
                steps[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                (out / "logs" / f"{name}-error.log").write_text(traceback.format_exc())
                ctx.check(name, "section", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            ctx.raw.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
        if background is not None:
            print("== pseudolabel", flush=True)
            ctx.deadline = max(end, time.monotonic() + 30)
            finish_pseudolabel(ctx, background)
    finally:
        for proc in (background, ctx.data_build):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    report = write_report(ctx, env, seconds)
    pack_logs(out / "logs")
    failed = [c for c in ctx.checks if c.ok is False]
    print(f"{len(ctx.checks)} checks, {len(failed)} failed, {seconds:.0f} s: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
