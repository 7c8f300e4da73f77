"""``labelpipe data check``: render :func:`labelpipe.data.check.check_dataset` as tables."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from labelpipe.data import DatasetSource
from labelpipe.data.check import check_dataset
from labelpipe.errors import LabelpipeError


def print_check(source: DatasetSource, console: Console | None = None) -> dict:
    console = console or Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("checking", total=None)
        report = check_dataset(source, progress=lambda done, total: progress.update(task, completed=done, total=total))
    splits = Table(title=f"{report['dataset']} at {report['root']}")
    columns = (
        "images",
        "masks",
        "missing_images",
        "missing_masks",
        "unreadable",
        "size_mismatches",
        "bad_mask_values",
    )
    splits.add_column("split")
    for col in columns:
        splits.add_column(col.replace("_", " "), justify="right")
    for name, row in report["splits"].items():
        splits.add_row(name, *(str(row.get(col, "")) for col in columns))
    console.print(splits)
    pixels = report["class_pixels"]
    total = max(sum(pixels.values()), 1)
    hist = Table(title="class pixels (all distinct masks)")
    hist.add_column("class")
    hist.add_column("pixels", justify="right")
    hist.add_column("%", justify="right")
    for name, n in pixels.items():
        hist.add_row(name, str(n), f"{100 * n / total:.2f}")
    hist.add_row("(ignored)", str(report["ignored_pixels"]), "")
    console.print(hist)
    for line in report["problems"][:50]:
        console.print(f"[red]problem[/]: {line}")
    if len(report["problems"]) > 50:
        console.print(f"... and {len(report['problems']) - 50} more")
    if not report["ok"]:
        raise LabelpipeError(f"{report['root']}: {len(report['problems'])} problem(s) found (listed above)")
    console.print("[green]no problems found[/]")
    return report
