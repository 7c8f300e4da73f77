"""What a run directory holds, summarised for people: each stage's state from its manifest, and every
evaluated model's metrics. Read by ``status``, ``report`` and ``compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labelpipe.store.manifest import effective_status


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
        elif status == "paused":
            note = f"paused at step {m.get('paused_at')} (a select candidate not chosen); resumable from checkpoint"
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


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def model_order(name: str) -> tuple[int, str]:
    """pretrain first, then round-1, round-2, ..., then anything else by name."""
    if name == "pretrain":
        return (0, "")
    if name.startswith("round-") and name[6:].isdigit():
        return (int(name[6:]), "")
    return (10**6, name)


def evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``evaluate/<model>/metrics.json`` of a run, pretrain first, then by round."""
    found = [m for p in run_dir.glob("evaluate/*/metrics.json") if (m := read_json(p)) and "per_class_iou" in m]
    return sorted(found, key=lambda m: model_order(m.get("model", "")))
