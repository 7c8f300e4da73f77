"""``labelpipe evaluate``: one global confusion matrix, per-class IoU, calibration, plots."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from labelpipe import plots
from labelpipe.config import RunConfig
from labelpipe.context import class_prior, load_trained_model, open_context, write_config
from labelpipe.data.base import preflight
from labelpipe.inference.measure import measure
from labelpipe.metrics import summarize
from labelpipe.runtime import Runtime, barrier
from labelpipe.store.atomic import atomic_write_json
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir


def print_table(metrics: dict, title: str, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    tail = set(metrics.get("tail_classes", []))
    for name, iou in metrics["per_class_iou"].items():
        table.add_row(name + (" (tail)" if name in tail else ""), "-" if iou is None else f"{100 * iou:.1f}")
    table.add_section()
    table.add_row("mIoU", f"{100 * metrics['miou']:.1f}")
    if metrics.get("tail_miou") is not None:
        table.add_row("tail mIoU", f"{100 * metrics['tail_miou']:.1f}")
    table.add_row("pixel accuracy", f"{100 * metrics['pixel_accuracy']:.1f}")
    table.add_row("ECE", f"{100 * metrics['ece']:.2f}")
    console.print(table)


def run_evaluate(config: RunConfig, run_dir: Path, runtime: Runtime, default_model: str | None = None) -> dict:
    """Evaluate while holding the ``evaluate`` lock of the run: ``evaluate.model``, else ``default_model`` (what
    ``labelpipe run``'s earlier stages produced), else the run's latest model."""
    with run_lock(run_dir, "evaluate", enabled=runtime.is_main):
        return _run_evaluate(config, run_dir, runtime, default_model)


def _run_evaluate(config: RunConfig, run_dir: Path, runtime: Runtime, default_model: str | None = None) -> dict:
    ctx = open_context(config, run_dir, runtime)
    config = ctx.config  # with defaults that depend on the data resolved
    split = config.evaluate.split or ctx.roles["test"]
    samples = ctx.source.split(split)
    name, model, weights = load_trained_model(ctx, config.evaluate.model or default_model)
    out_dir = run_dir / "evaluate" / name
    stage = StageDir(out_dir)
    preflight(samples)  # validate, then act
    write_config(ctx)
    if runtime.is_main:
        stage.begin("evaluate", "", {"model": str(weights), "split": split})
    cm, cal, rows = measure(ctx, model, samples, config.evaluate.batch_size, config.evaluate.num_samples)
    prior = class_prior(ctx, ctx.roles["labeled"])
    metrics = summarize(cm.numpy(), ctx.source.classes, prior, cal.ece(), ctx.source.class_subsets)
    metrics.update(
        model=name, split=split, images=len(samples), reliability=cal.reliability(), confusion=cm.numpy().tolist()
    )  # rows: ground truth, columns: prediction
    if not runtime.is_main:
        barrier()
        return metrics
    atomic_write_json(out_dir / "metrics.json", metrics)
    plots.per_class_bars(metrics["per_class_iou"], out_dir / "per_class.png", f"{name} on {split}: per-class IoU")
    plots.confusion(cm.numpy(), ctx.source.classes, out_dir / "confusion.png")
    rel = cal.reliability()
    plots.reliability(
        rel["bin_confidence"],
        rel["bin_accuracy"],
        rel["bin_count"],
        out_dir / "reliability.png",
        f"{name}: ECE {metrics['ece']:.3f}",
    )
    if rows:
        plots.image_grid(rows, ["image", "ground truth", "prediction"], out_dir / "samples.png")
    print_table(metrics, f"{name} on {split} ({len(samples)} images)")
    stage.finish(["metrics.json", "per_class.png", "confusion.png"], {"miou": metrics["miou"]})
    barrier()  # the other ranks return once the results are on disk
    return metrics


def print_comparison(before: dict, after: dict, console: Console | None = None) -> None:
    """Before/after table of two evaluations of the same split (e.g. pretrain vs the last round)."""
    console = console or Console()
    table = Table(title=f"{before['model']} -> {after['model']} on {after['split']}")
    table.add_column("class")
    table.add_column(before["model"], justify="right")
    table.add_column(after["model"], justify="right")
    table.add_column("change", justify="right")

    def fmt(v):
        return "-" if v is None else f"{100 * v:.1f}"

    for name in after["per_class_iou"]:
        b, a = before["per_class_iou"].get(name), after["per_class_iou"][name]
        delta = "" if a is None or b is None else f"{100 * (a - b):+.1f}"
        table.add_row(name, fmt(b), fmt(a), delta)
    table.add_section()
    for key, label in (("miou", "mIoU"), ("tail_miou", "tail mIoU"), ("pixel_accuracy", "pixel acc")):
        b, a = before.get(key), after.get(key)
        table.add_row(label, fmt(b), fmt(a), "" if a is None or b is None else f"{100 * (a - b):+.1f}")
    console.print(table)
