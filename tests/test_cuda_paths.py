"""labelpipe's CUDA code paths, run on a GPU: AMP (bf16, fp16 with the gradient scaler), channels_last,
cudnn.benchmark, pinned memory with loader workers, SyncBatchNorm, torch.compile (inductor), resume.

Every test is marked ``cuda`` and skipped where no CUDA device is visible, so on a CPU machine they are
collected and skipped. ``pytest -m cuda`` runs them alone; benchmarks/gpu_check.py runs them first on a
GPU machine. They check behaviour, not only that the code runs: master weights stay float32 under
autocast, the fp16 path scales its loss and checkpoints the scale, channels_last gives the CPU model's
output, workers deliver the in-process loader's batches in pinned memory, a resumed GPU run continues its
step count, a compiled model's first loss is the eager one's.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, TINY_RECIPE, run_cli

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="no CUDA device: the CUDA paths run on a GPU machine (pytest -m cuda)"),
]
SELFTRAIN_FLAGS = ["--rounds", "1", "--pseudo-source", "teacher", "--contrastive", "--rectified", "--denoise"]
SELFTRAIN_FLAGS += ["--strong-aug"]


def labelpipe_attr(name: str, *modules: str):
    """``name`` from the first module that has it: the training and inference helpers are moving out of
    labelpipe.stages into packages of their own; these tests follow them."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} is in none of {modules}")


def training_attr(name: str):
    """A training-loop helper (train, TrainJob, for_training, wrap_ddp, step_loader), in labelpipe.stages
    today, in a labelpipe.training package (any of its modules) after the move."""
    modules = ["labelpipe.training", "labelpipe.training.loop", "labelpipe.stages.pretrain"]
    try:
        package = importlib.import_module("labelpipe.training")
        modules += [info.name for info in pkgutil.walk_packages(package.__path__, "labelpipe.training.")]
    except (ImportError, AttributeError):  # not moved yet (or a plain module)
        pass
    return labelpipe_attr(name, *modules)


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cuda_runtime(world: int = 1):
    from labelpipe.runtime import Runtime

    return Runtime(device=torch.device("cuda", torch.cuda.current_device()), rank=0, world=world)


def small_model(classes: int = 5):
    from labelpipe.models import build_model

    torch.manual_seed(0)
    return build_model(classes, "resnet18", 16, (1, 2, 3), 16)


def train_config(**overrides):
    from labelpipe.config import TrainConfig

    base = {"steps": 6, "batch_size": 4, "crop_size": 32, "lr": 0.01, "log_every": 1, "checkpoint_every": 3}
    return TrainConfig(**{**base, **overrides})


def run_training_loop(tmp_path: Path, steps: int = 6, **cfg_overrides) -> tuple[torch.nn.Module, dict, list[dict]]:
    """labelpipe's training loop on CUDA with a fixed batch; returns (plain model, checkpoint, the
    objective's observations). A fixed batch: the loss must fall."""
    train, TrainJob = training_attr("train"), training_attr("TrainJob")  # noqa: N806 - a class
    for_training = training_attr("for_training")
    rt = cuda_runtime()
    cfg = train_config(steps=steps, **cfg_overrides)
    model = small_model()
    net = for_training(model, rt, cfg, uses_rep=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=gen).to(rt.device)
    masks = torch.randint(0, 5, (4, 32, 32), generator=gen).to(rt.device)
    seen: list[dict] = []

    def batches(start: int):
        for _ in range(start, steps):
            yield {"image": images, "mask": masks}

    def objective(batch: dict, step: int):
        out = net(batch["image"], with_rep=False)
        loss = F.cross_entropy(out.main.float(), batch["mask"]) + 0.4 * F.cross_entropy(out.aux.float(), batch["mask"])
        seen.append({"dtype": out.main.dtype, "autocast": torch.is_autocast_enabled("cuda")})
        return loss, {"images": 4}

    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    job = TrainJob(stage_dir, net, steps, batches, objective, cfg, rt, fingerprint="cuda-test")
    train(job)
    state = torch.load(stage_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    log = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    return model, state, [*seen, *log]


def test_autocast_picks_bf16_where_supported_fp16_otherwise(monkeypatch):
    autocast = labelpipe_attr("autocast", "labelpipe.context", "labelpipe.training", "labelpipe.runtime")
    device = torch.device("cuda")
    a = torch.randn(8, 8, device=device)
    with autocast(device, enabled=False):
        assert (a @ a).dtype == torch.float32
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with autocast(device, enabled=True):
        assert (a @ a).dtype == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with autocast(device, enabled=True):
        assert (a @ a).dtype == torch.float16


def test_amp_training_step_keeps_float32_master_weights(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16; the fp16 test covers its AMP path")
    model, state, records = run_training_loop(tmp_path)
    observed, log = records[:6], [r for r in records[6:] if "loss" in r]
    assert all(o["dtype"] == torch.bfloat16 and o["autocast"] for o in observed)  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights the optimizer updates
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    losses = [r["loss"] for r in log]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert state["step"] == 6
    assert not state["scaler"]  # bf16 needs no loss scaling: the scaler stays disabled


def test_fp16_with_grad_scaler_trains_and_checkpoints_the_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    before = {name: p.detach().clone() for name, p in small_model().named_parameters()}
    model, state, records = run_training_loop(tmp_path)
    observed, log = records[:6], [r for r in records[6:] if "loss" in r]
    assert all(o["dtype"] == torch.float16 for o in observed)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach().cpu())}
    # Steps were taken (not all skipped for overflow): every trained weight moved, the frozen head did not.
    assert changed == {name for name in before if not name.startswith("representation.")}
    assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state is in the checkpoint
    losses = [r["loss"] for r in log]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_channels_last_model_gives_the_cpu_models_output():
    for_training = training_attr("for_training")
    from labelpipe.runtime import unwrap

    reference = small_model().eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x, with_rep=False).main
    model = small_model()
    net = for_training(model, cuda_runtime(), train_config(), uses_rep=False)
    assert unwrap(net) is model  # what is saved is the plain module
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    model.eval()
    with torch.no_grad():
        got = net(x.cuda(), with_rep=False).main.float().cpu()
    # TF32 convolutions on Ampere and later: ~1e-3 relative.
    assert (got - expected).norm() / expected.norm() < 1e-2


def test_setup_turns_cudnn_benchmark_on():
    from labelpipe.runtime import select_device, setup

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        rt = setup("cuda")
        assert rt.device.type == "cuda" and torch.backends.cudnn.benchmark
        assert select_device("auto").type == "cuda"
    finally:
        torch.backends.cudnn.benchmark = before


def test_loader_workers_deliver_the_in_process_batches_in_pinned_memory(data_cache, tmp_path):
    from labelpipe.config import resolve_config
    from labelpipe.context import open_context
    from labelpipe.data.dataset import SegmentationDataset
    from labelpipe.data.transforms import weak_transform
    from labelpipe.runtime import Runtime

    step_loader = training_attr("step_loader")
    config = resolve_config(None, recipe=TINY_RECIPE)

    def batches(runtime) -> list[dict]:
        ctx = open_context(config, tmp_path / runtime.device.type, runtime)
        cfg = ctx.config.train
        dataset = SegmentationDataset(
            ctx.source, ctx.source.split(ctx.roles["labeled"]), weak_transform(cfg.crop_size, cfg.scale_range, True)
        )
        return list(step_loader(ctx, dataset, 4, 0, 3)(0))

    on_gpu = batches(cuda_runtime())  # CUDA: 4 workers (train.num_workers unset), pinned memory
    in_process = batches(Runtime(device=torch.device("cpu")))  # CPU: no workers
    assert len(on_gpu) == len(in_process) == 3
    for a, b in zip(on_gpu, in_process, strict=True):
        assert a["image"].is_pinned() and a["mask"].is_pinned()
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])  # seeded per sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batchnorm_conversion_trains_like_batchnorm_on_one_gpu():
    """wrap_ddp converts BatchNorm to SyncBatchNorm on CUDA and wraps in DDP over NCCL. One GPU here: a
    one-process NCCL group, and a Runtime that says 2 processes so that wrap_ddp takes its distributed
    branch (with one process, SyncBatchNorm's statistics are the batch's: BatchNorm's output)."""
    from labelpipe.runtime import unwrap

    wrap_ddp = training_attr("wrap_ddp")
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        rt = dataclasses.replace(cuda_runtime(), world=2)
        reference = small_model().cuda().train()
        model = small_model().cuda().train()
        ddp = wrap_ddp(model, rt, sync_bn=True)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        norms = [m for m in unwrap(ddp).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
        x = torch.randn(4, 3, 32, 32, device="cuda")
        y = torch.randint(0, 5, (4, 32, 32), device="cuda")
        out, expected = ddp(x, with_rep=False).main, reference(x, with_rep=False).main
        loss = F.cross_entropy(out, y)
        loss.backward()
        assert torch.isfinite(loss)
        assert (out - expected).norm() / expected.norm() < 1e-2
        grads = [p.grad for p in unwrap(ddp).parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL refuses two ranks on one GPU)")
def test_pretrain_on_two_gpus_with_sync_batchnorm(data_cache, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "run"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "labelpipe", "--", "pretrain"]
    cmd += ["--config", str(TINY_RECIPE), "--run", str(run), "--device", "cuda", "--set", "train.sync_bn=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(line).get("loss") for line in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses if x is not None)


def log_losses(stage_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_compiled_cuda_training_matches_eager_and_saves_plain_weights(data_cache, tmp_path):
    from safetensors import safe_open

    common = ["--config", str(TINY_RECIPE), "--device", "cuda", "--set", "train.steps=4"]
    assert run_cli(["pretrain", "--run", str(tmp_path / "eager"), *common]) == 0
    compiled = ["--set", "train.compile=default"]  # inductor, as a user runs it
    assert run_cli(["pretrain", "--run", str(tmp_path / "compiled"), *common, *compiled]) == 0
    eager, comp = log_losses(tmp_path / "eager" / "pretrain"), log_losses(tmp_path / "compiled" / "pretrain")
    assert [s for s, _ in comp] == [s for s, _ in eager] == [1, 2, 3, 4]
    # Same weights, same batch: the first loss agrees up to kernel differences (bf16).
    assert comp[0][1] == pytest.approx(eager[0][1], rel=2e-2)
    assert all(math.isfinite(x) for _, x in comp)
    with safe_open(tmp_path / "compiled" / "pretrain" / "model.safetensors", "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


@pytest.fixture(scope="module")
def cuda_pretrained(data_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cuda") / "run"
    assert run_cli(["pretrain", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cuda"]) == 0
    return run


def test_selftrain_round_with_every_feature_on_cuda(cuda_pretrained):
    """EMA teacher, online labels, contrastive loss with the memory bank, rectified loss, denoising and
    CutMix on the GPU; predict (pinned memory, channels_last inference) and pseudolabel before it."""
    args = ["selftrain", "--config", str(TINY_RECIPE), "--run", str(cuda_pretrained), "--device", "cuda"]
    assert run_cli([*args, *SELFTRAIN_FLAGS]) == 0
    stage = cuda_pretrained / "selftrain" / "round-1" / "train"
    records = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, len(train_records) + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_unsup"]) for r in train_records)
    assert all("loss_contrastive" in r for r in train_records)
    assert (stage / "model.safetensors").is_file()


def test_killed_cuda_run_resumes_and_continues_the_step_count(data_cache, tmp_path):
    gc = gpu_check()
    run = tmp_path / "run"
    steps = 40
    cmd = [sys.executable, "-m", "labelpipe", "pretrain", "--config", str(TINY_RECIPE), "--run", str(run)]
    cmd += ["--device", "cuda", "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=5"]
    cmd += ["--set", "train.log_every=1", "--set", f"train.val_every={steps}"]
    env = {**__import__("os").environ}
    log = run / "pretrain" / "log.jsonl"
    seen, status = gc.kill_after_step(cmd, log, 12, env, tmp_path / "killed.log", timeout=240)
    assert seen is not None, f"the run ended before step 12 (exit {status})"
    assert status != 0
    before = dict(log_losses(run / "pretrain"))
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    starts = [int(line.split()[4]) for line in resumed.stdout.splitlines() if line.startswith("resuming pretrain")]
    assert starts and 5 <= starts[0] <= seen and starts[0] % 5 == 0  # from a checkpoint, not from step 0
    after = log_losses(run / "pretrain")
    assert [s for s, _ in after] == list(range(1, steps + 1))  # each step logged once
    # The steps up to the checkpoint are the killed run's own records, kept as they were.
    assert all(before[s] == x for s, x in after if s <= starts[0])
    assert all(math.isfinite(x) for _, x in after)
    manifest = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    state = torch.load(run / "pretrain" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == steps
