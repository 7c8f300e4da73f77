"""A control for self-training under domain shift: how much of a round's gain is BatchNorm adaptation alone?

Self-training on target images runs the model in train mode on them, so its BatchNorm statistics move
to the target domain whether or not the pseudo-labels teach anything ("AdaBN": recompute the running
statistics on target images, no weight changes). This script takes trained runs, re-estimates every
BatchNorm layer's statistics on the protocol's unlabeled split (a plain average over all of its
images, eval-mode dropout, no gradient) and evaluates on the test split, next to the model as
trained. A self-training configuration that gains about as much as AdaBN has learnt little from its
pseudo-labels; one that gains more has.

    python benchmarks/adabn_control.py runs/matrix/da-s0/pretrain-only runs/matrix/semi-1_16-s0/pretrain-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from labelpipe.config import resolve_config
from labelpipe.context import class_prior, load_trained_model, open_context
from labelpipe.data.dataset import SegmentationDataset, collate
from labelpipe.inference.measure import measure
from labelpipe.metrics import summarize
from labelpipe.runtime import setup


@torch.no_grad()
def adapt_batchnorm(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> None:
    """Every BatchNorm layer's running statistics = their average over ``loader``'s images."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    for batch in loader:
        model(batch["image"].to(device), with_rep=False)
    model.eval()


def metrics(ctx, model, split: str) -> dict:
    """``labelpipe evaluate``'s numbers of ``model`` on ``split`` (mIoU, tail mIoU, per-class IoU, ...)."""
    samples = ctx.source.split(split)
    cm, cal, _ = measure(ctx, model, samples, ctx.config.evaluate.batch_size)
    prior = class_prior(ctx, ctx.roles["labeled"])
    return summarize(cm.numpy(), ctx.source.classes, prior, cal.ece(), ctx.source.class_subsets)


def evaluate(ctx, model, split: str) -> tuple[float, float]:
    m = metrics(ctx, model, split)
    return m["miou"], m["tail_miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with a trained model")
    parser.add_argument("--model", default=None, help="pretrain or round-K (default: the latest)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rt = setup("cpu")
    print("| run | model | test mIoU | + AdaBN on unlabeled | change | tail mIoU | + AdaBN | change |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        ctx = open_context(resolve_config(run), run, rt)
        name, model, _ = load_trained_model(ctx, args.model)
        test = ctx.roles["test"]
        before = evaluate(ctx, model, test)
        unlabeled = SegmentationDataset(ctx.source, ctx.source.split(ctx.roles["unlabeled"]), require_masks=False)
        adapt_batchnorm(model, DataLoader(unlabeled, batch_size=64, collate_fn=collate), rt.device)
        after = evaluate(ctx, model, test)
        print(
            f"| {run} | {name} | {100 * before[0]:.1f} | {100 * after[0]:.1f} | {100 * (after[0] - before[0]):+.1f} | "
            f"{100 * before[1]:.1f} | {100 * after[1]:.1f} | {100 * (after[1] - before[1]):+.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
