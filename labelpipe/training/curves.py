"""``curves.png`` of a training stage: drawn from its ``log.jsonl`` (and, in self-training, the rounds'
pseudo-label reports), at every validation and at the end of training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a torn last line (a kill while writing) is left out."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def round_history(selftrain_dir: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """Per round K (<= ``upto``) of ``selftrain_dir/round-K/pseudolabel/report.json``: kept fraction and,
    where the unlabeled split has ground truth, the pixel precision of the kept pseudo-labels and their mIoU.

    The precision is each class's precision (correct / kept pixels with a ground-truth label) weighted by
    the class's kept pixels: the fraction of kept pseudo-labelled pixels that are right.
    """
    rounds = []
    for report_path in sorted(
        selftrain_dir.glob("round-*/pseudolabel/report.json"), key=lambda p: int(p.parent.parent.name.split("-")[1])
    ):
        k = int(report_path.parent.parent.name.split("-")[1])
        if upto is not None and k > upto:
            continue
        try:
            report = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entry: dict[str, Any] = {"round": k, "kept_fraction": report.get("kept_fraction")}
        if report.get("has_ground_truth"):
            per_class = report.get("per_class", {}).values()
            weighted = [(c["precision"], c["kept"]) for c in per_class if c.get("precision") is not None and c["kept"]]
            total = sum(kept for _, kept in weighted)
            entry["precision"] = sum(p * kept for p, kept in weighted) / total if total else None
            entry["pseudo_miou"] = report.get("pseudo_miou")
        rounds.append(entry)
    return rounds


def write_curves(stage_dir: Path, rounds: list[dict[str, Any]] | None = None, title: str = "") -> Path:
    """``stage_dir/curves.png`` from ``stage_dir/log.jsonl``; returns its path."""
    from labelpipe import plots  # matplotlib only when a figure is drawn

    return plots.training_curves(read_log(stage_dir / "log.jsonl"), stage_dir / "curves.png", rounds, title)
