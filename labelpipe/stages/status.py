"""``labelpipe status``: each stage's state, read from the manifests of a run."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from labelpipe.errors import LabelpipeError
from labelpipe.store.run_summary import collect

STYLE = {"done": "green", "running": "yellow", "paused": "cyan", "failed": "red", "interrupted": "magenta"}


def show_status(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise LabelpipeError(f"{run_dir}: is a file, not a run directory; pass the --run of an earlier command")
    if not run_dir.is_dir():
        raise LabelpipeError(f"{run_dir}: no such run directory; pass the --run of an earlier command")
    rows = collect(run_dir)
    table = Table(title=f"run {run_dir}")
    table.add_column("stage", no_wrap=True)
    for col in ("status", "wall", "finished", "summary", "note"):
        table.add_column(col, no_wrap=col != "note")
    for r in rows:
        finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["finished"])) if r["finished"] else ""
        wall = f"{r['wall_s']:.0f}s" if r["wall_s"] is not None else ""
        style = STYLE.get(r["status"], "")
        table.add_row(
            r["stage"],
            f"[{style}]{r['status']}[/]" if style else r["status"],
            wall,
            finished,
            r["summary"],
            r["note"],
        )
    if not rows:
        table.add_row("(no stage has run yet)", "", "", "", "", "")
    Console().print(table)
