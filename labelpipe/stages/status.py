"""``labelpipe status``: each stage's state, read from the manifests of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from labelpipe.errors import LabelpipeError
from labelpipe.store.manifest import effective_status

STYLE = {"done": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}


def collect(run_dir: Path) -> list[dict]:
    rows = []
    for manifest in sorted(run_dir.rglob("manifest.json")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            m = {"status": "unreadable"}
        if not isinstance(m, dict):
            m = {"status": "unreadable"}
        status = effective_status(m)  # "running" whose process is gone: interrupted
        stage = str(manifest.parent.relative_to(run_dir))
        summary = m.get("summary") or {}
        key = next(
            (k for k in ("miou", "pseudo_miou", "kept_fraction", "images") if isinstance(summary.get(k), int | float)),
            None,
        )
        if status in ("running", "interrupted") and (manifest.parent / "checkpoint.pt").is_file():
            note = "resumable from checkpoint"
        elif status == "interrupted":
            note = "its process is gone; run its command again to resume"
        else:
            note = m.get("error", "")
        rows.append(
            {
                "stage": stage,
                "status": status,
                "wall_s": m.get("wall_s"),
                "finished": m.get("finished"),
                "summary": f"{key} {summary[key]:.4g}" if key else "",
                "note": note,
            }
        )
    return rows


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
