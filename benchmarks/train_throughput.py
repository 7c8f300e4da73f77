"""Training and inference throughput of labelpipe's models at the demo size (stages/demo.yaml).

Training step = forward, CE(main) + 0.4 CE(aux), backward, SGD step (momentum 0.9, wd 1e-4, the
stage's two parameter groups), on random 64 x 64 images and labels of the 11 DigitScapes classes,
batch 16. Inference = eval mode, no grad, batch 64, main + aux heads. Images/s from the median
step time (warm-up steps excluded). CPU with ``--threads`` (default 2) threads; where CUDA is
available also on the GPU with bf16 autocast. The weights are NHWC (channels_last), as every stage places
them (``labelpipe.runtime.place``, ``train.channels_last``); ``--layouts nhwc,nchw`` times each model in both
layouts (interleaved too) and adds the speed-up of NHWC over NCHW.

The models' steps are interleaved (one step of each model in turn, ``--steps`` times), so that a
machine shared with other work slows every model alike and the ratios to the demo model hold even
when the absolute figures do not.

    python benchmarks/train_throughput.py [--quick] [--threads 2] [--steps 8] [--only demo,n,s,m] [--layouts nhwc,nchw]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from labelpipe.models import SCALES, build_model
from labelpipe.runtime import place

NUM_CLASSES, SIZE, TRAIN_BATCH, INFER_BATCH, AUX_WEIGHT = 11, 64, 16, 64, 0.4

# (key, label, build_model keyword arguments). At 64 x 64 the stride-16 map is 4 x 4, so the demo
# uses rates 1, 2, 3; at stride 8 (an 8 x 8 map) those rates are doubled, as DeepLab doubles them.
MODELS = [
    ("demo", "resnet18 OS16 DeepLabv3+", dict(backbone="resnet18", output_stride=16, aspp_rates=(1, 2, 3))),
    ("r18os8", "resnet18 OS8 DeepLabv3+", dict(backbone="resnet18", output_stride=8, aspp_rates=(2, 4, 6))),
    ("mnv3", "mobilenet_v3_large OS16", dict(backbone="mobilenet_v3_large", output_stride=16, aspp_rates=(1, 2, 3))),
    ("r50", "resnet50 OS16 DeepLabv3+", dict(backbone="resnet50", output_stride=16, aspp_rates=(1, 2, 3))),
    ("lite0dl", "lite0 OS16 DeepLabv3+", dict(backbone="efficientnet_lite0", output_stride=16, aspp_rates=(1, 2, 3))),
] + [
    (
        name,
        f"scale {name}: lite0 OS{spec.output_stride} FPN{spec.decoder_channels}",
        dict(backbone=spec.backbone, output_stride=spec.output_stride, rep_dim=spec.rep_dim, scale=name),
    )
    for name, spec in SCALES.items()
]
QUICK = ("demo", "mnv3", "n", "s", "m")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


LAYOUTS = {"nhwc": True, "nchw": False}  # layout -> channels_last


def prepare(kwargs: dict, device: torch.device, channels_last: bool = True):
    """(train step, inference step) closures of one model on ``device`` (placed as the stages place it; the
    images stay NCHW, as the data loader makes them: a convolution's output follows its weight's layout)."""
    torch.manual_seed(0)
    model = place(build_model(NUM_CLASSES, **kwargs), device, channels_last)
    model.representation.requires_grad_(False)
    backbone_params, head_params = model.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": backbone_params, "lr": 0.01}, {"params": head_params, "lr": 0.1}],
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
    )
    images = torch.randn(TRAIN_BATCH, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, NUM_CLASSES, (TRAIN_BATCH, SIZE, SIZE), device=device)
    batch = torch.randn(INFER_BATCH, 3, SIZE, SIZE, device=device)

    def train_step() -> None:
        model.train()
        with autocast(device):
            out = model(images, with_rep=False)  # as pretrain: no loss reads the representation head
            loss = F.cross_entropy(out.main.float(), labels)
            loss = loss + AUX_WEIGHT * F.cross_entropy(out.aux.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        model.eval()
        with torch.no_grad(), autocast(device):
            model(batch, with_rep=False)  # as predict / evaluate

    return train_step, infer_step


def timed(step, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def bench_interleaved(
    models: list, device: torch.device, warmup: int, steps: int, layouts: tuple[str, ...] = ("nhwc",)
) -> dict[tuple[str, str], tuple[float, float]]:
    """(key, layout) -> (median train s/step, median inference s/step), the models' steps taken in turn."""
    steps_of = {
        (key, layout): prepare(kwargs, device, LAYOUTS[layout]) for key, _, kwargs in models for layout in layouts
    }
    train = {key: [] for key in steps_of}
    infer = {key: [] for key in steps_of}
    for index in range(warmup + steps):
        for key, (train_step, infer_step) in steps_of.items():
            t, i = timed(train_step, device), timed(infer_step, device)
            if index >= warmup:
                train[key].append(t)
                infer[key].append(i)
    return {key: (statistics.median(train[key]), statistics.median(infer[key])) for key in steps_of}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 warm-up and 3 timed steps, models {','.join(QUICK)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median); --quick: 3")
    parser.add_argument("--only", default=None, help=f"comma-separated model keys of {','.join(k for k, *_ in MODELS)}")
    parser.add_argument("--layouts", default="nhwc", help="comma-separated weight layouts: nhwc (the stages'), nchw")
    args = parser.parse_args()
    layouts = tuple(args.layouts.split(","))
    if not layouts or set(layouts) - set(LAYOUTS) or len(set(layouts)) < len(layouts):
        parser.error(f"--layouts {args.layouts}: a comma-separated list of distinct layouts among nhwc, nchw")
    torch.set_num_threads(args.threads)
    warmup, steps = (1, 3) if args.quick else (2, args.steps)
    keys = args.only.split(",") if args.only else (QUICK if args.quick else [k for k, *_ in MODELS])
    unknown = sorted(set(keys) - {k for k, *_ in MODELS})
    if unknown:
        parser.error(f"unknown model keys {unknown}")
    models = [m for m in MODELS if m[0] in keys]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    print(
        f"Throughput: {SIZE}x{SIZE}, {NUM_CLASSES} classes, train batch {TRAIN_BATCH} "
        f"(fwd + CE main + {AUX_WEIGHT} CE aux + bwd + SGD), inference batch {INFER_BATCH} "
        "(eval, no grad); "
        f"median of {steps} interleaved steps after {warmup} warm-up; torch {torch.__version__}"
    )
    for device in devices:
        if device.type == "cuda":
            name = f"{torch.cuda.get_device_name(device)} (bf16 autocast)"
        else:
            name = f"CPU, {torch.get_num_threads()} threads, float32"
        print(f"\n{name}")
        both = len(layouts) > 1  # the NHWC speed-up over NCHW, train / inference
        header = f"{'model':<32} {'layout':>6} {'train img/s':>11} {'ms/step':>9} {'x demo':>7} {'infer img/s':>12}"
        print(header + (f" {'NHWC/NCHW train, infer':>22}" if both else "") + f" {'params M':>9}")
        results = bench_interleaved(models, device, warmup, steps, layouts)
        for key, label, kwargs in models:
            params = sum(p.numel() for p in build_model(NUM_CLASSES, **kwargs).parameters()) / 1e6
            for layout in layouts:
                train_s, infer_s = results[key, layout]
                reference = results.get(("demo", layout), (None,))[0]  # the demo model in the same layout
                ratio = f"{reference / train_s:>7.2f}" if reference else f"{'-':>7}"
                line = f"{label:<32} {layout.upper():>6} {TRAIN_BATCH / train_s:>11.1f} {train_s * 1e3:>9.0f} {ratio} "
                line += f"{INFER_BATCH / infer_s:>12.1f}"
                if both:
                    (nhwc_t, nhwc_i), (nchw_t, nchw_i) = results[key, "nhwc"], results[key, "nchw"]
                    line += (
                        f" {f'{nchw_t / nhwc_t:.2f}x, {nchw_i / nhwc_i:.2f}x':>22}" if layout == "nhwc" else " " * 23
                    )
                print(f"{line} {params:>9.2f}")


if __name__ == "__main__":
    main()
