"""Training and inference throughput of labelpipe's models at the demo size (stages/demo.yaml).

Training step = forward, CE(main) + 0.4 CE(aux), backward, SGD step (momentum 0.9, wd 1e-4, the
stage's two parameter groups), on random 64 x 64 images and labels of the 11 DigitScapes classes,
batch 16. Inference = eval mode, no grad, batch 64, main + aux heads. Images/s from the median
step time (warm-up steps excluded). CPU with ``--threads`` (default 2) threads; where CUDA is
available also on the GPU with bf16 autocast and channels_last, as ``labelpipe pretrain`` runs there.

    python benchmarks/train_throughput.py [--quick] [--threads 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from labelpipe.models import build_model

NUM_CLASSES, SIZE, TRAIN_BATCH, INFER_BATCH, AUX_WEIGHT = 11, 64, 16, 64, 0.4

# (label, backbone, output stride, ASPP rates). At 64 x 64 the stride-16 map is 4 x 4, so the demo
# uses rates 1, 2, 3; at stride 8 (an 8 x 8 map) those rates are doubled, as DeepLab doubles them.
MODELS = [
    ("resnet18 OS16 (demo)", "resnet18", 16, (1, 2, 3)),
    ("resnet18 OS8", "resnet18", 8, (2, 4, 6)),
    ("mobilenet_v3_large OS16", "mobilenet_v3_large", 16, (1, 2, 3)),
    ("resnet50 OS16", "resnet50", 16, (1, 2, 3)),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def median_seconds(step, device: torch.device, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(backbone: str, stride: int, rates, device: torch.device, warmup: int, steps: int):
    """(train images/s, inference images/s) of one model on ``device``."""
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, backbone, stride, rates).to(device)
    model.representation.requires_grad_(False)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    backbone_params, head_params = model.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": backbone_params, "lr": 0.01}, {"params": head_params, "lr": 0.1}],
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
    )
    images = torch.randn(TRAIN_BATCH, 3, SIZE, SIZE, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (TRAIN_BATCH, SIZE, SIZE), device=device)

    def train_step() -> None:
        with autocast(device):
            out = model(images, with_rep=False)  # as pretrain: no loss reads the representation head
            loss = F.cross_entropy(out.main.float(), labels)
            loss = loss + AUX_WEIGHT * F.cross_entropy(out.aux.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train_s = median_seconds(train_step, device, warmup, steps)

    batch = torch.randn(INFER_BATCH, 3, SIZE, SIZE, device=device).to(memory_format=memory_format)

    def infer_step() -> None:
        with torch.no_grad(), autocast(device):
            model(batch, with_rep=False)  # as predict / evaluate

    model.eval()
    infer_s = median_seconds(infer_step, device, warmup, steps)
    return TRAIN_BATCH / train_s, INFER_BATCH / infer_s, train_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps, and no resnet50")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median); --quick: 3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup, steps = (1, 3) if args.quick else (2, args.steps)
    models = [m for m in MODELS if not (args.quick and m[1] == "resnet50")]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    print(
        f"DeepLabV3+ throughput: {SIZE}x{SIZE}, {NUM_CLASSES} classes, train batch {TRAIN_BATCH} "
        f"(fwd + CE main + {AUX_WEIGHT} CE aux + bwd + SGD), inference batch {INFER_BATCH} "
        "(eval, no grad); "
        f"median of {steps} steps after {warmup} warm-up; torch {torch.__version__}"
    )
    for device in devices:
        if device.type == "cuda":
            name = f"{torch.cuda.get_device_name(device)} (bf16 autocast, channels_last)"
        else:
            name = f"CPU, {torch.get_num_threads()} threads, float32"
        print(f"\n{name}")
        print(f"{'model':<26} {'train img/s':>11} {'ms/step':>9} {'infer img/s':>12}")
        for label, backbone, stride, rates in models:
            train_ips, infer_ips, train_s = bench_model(backbone, stride, rates, device, warmup, steps)
            print(f"{label:<26} {train_ips:>11.1f} {train_s * 1e3:>9.0f} {infer_ips:>12.1f}")


if __name__ == "__main__":
    main()
