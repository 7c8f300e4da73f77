"""``labelpipe compare RUN...``: the evaluated models of several runs in one table.

One row per (run, model, split) from each run's ``evaluate/<model>/metrics.json``: mIoU, tail mIoU
and the per-class IoU. Runs whose configs differ only in ``seed`` (the settings that define a result:
data, model, train, predict, pseudolabel, selftrain; execution-only settings such as the number of
loader workers do not count) are folded into one row per model and split with mean +- sample
standard deviation over the seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from labelpipe.errors import LabelpipeError
from labelpipe.store.run_summary import evaluations

RESULT_SECTIONS = ("data", "model", "train", "predict", "pseudolabel", "selftrain")


@dataclass
class CompareRow:
    """One model on one split, over one run or several seeds of the same config (values in [0, 1])."""

    runs: list[str]
    seeds: list[int | None]
    model: str
    split: str
    miou: list[float]
    tail_miou: list[float | None]
    per_class: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if len(self.runs) == 1:
            return self.runs[0]
        return f"{', '.join(self.runs)} ({len(self.runs)} seeds)"


def config_key(run_dir: Path) -> tuple[str, int | None]:
    """(the run's result-defining config without the seed, as canonical JSON; the seed)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return f"unknown:{run_dir.resolve()}", None  # never grouped with another run
    from labelpipe.config import load_yaml, validate

    config = validate(load_yaml(path), str(path))
    sections = {name: getattr(config, name).fingerprint_fields() for name in RESULT_SECTIONS}
    return json.dumps(sections, sort_keys=True, default=str), config.seed


def collect_rows(run_dirs: list[Path], split: str | None = None, model: str | None = None) -> list[CompareRow]:
    """The rows of the table, in the order of the runs given (groups where their first run comes)."""
    if not run_dirs:
        raise LabelpipeError("compare: pass at least one run directory")
    rows: dict[tuple[str, str, str], CompareRow] = {}
    seen_seeds: dict[tuple[str, str, str], set[int | None]] = {}
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise LabelpipeError(f"{run_dir}: no such run directory; pass runs that `labelpipe evaluate` has seen")
        key, seed = config_key(run_dir)
        found = [
            m
            for m in evaluations(run_dir)
            if (split is None or m.get("split") == split) and (model is None or m.get("model") == model)
        ]
        if not found:
            what = " ".join(f"{k} {v}" for k, v in (("--split", split), ("--model", model)) if v)
            raise LabelpipeError(
                f"{run_dir}: no evaluated model{' for ' + what if what else ''}; "
                f"run `labelpipe evaluate --run {run_dir}` first"
            )
        for m in found:
            group = (key, m["model"], m.get("split", "?"))
            if group in rows and seed in seen_seeds[group]:  # the same seed twice is not a repeat: own row
                group = (f"{key}#{run_dir}", *group[1:])
            row = rows.get(group)
            if row is None:
                row = rows[group] = CompareRow([], [], m["model"], m.get("split", "?"), [], [])
                seen_seeds[group] = set()
            seen_seeds[group].add(seed)
            row.runs.append(str(run_dir))
            row.seeds.append(seed)
            row.miou.append(m["miou"])
            row.tail_miou.append(m.get("tail_miou"))
            for name, iou in m["per_class_iou"].items():
                row.per_class.setdefault(name, []).append(iou)
    return list(rows.values())


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the defined values; std None for fewer than two."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None
    mean = sum(defined) / len(defined)
    if len(defined) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in defined) / (len(defined) - 1))


def fmt(values: list[float | None]) -> str:
    """Percent with one decimal; ``mean ± std`` over several seeds."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def compare_table(rows: list[CompareRow]) -> Table:
    classes = list(dict.fromkeys(c for r in rows for c in r.per_class))
    table = Table(title="IoU (%) by run and model; mean ± std over seeds where runs differ only in seed")
    table.add_column("run")
    table.add_column("model")
    table.add_column("split")
    table.add_column("mIoU", justify="right", style="bold")
    table.add_column("tail mIoU", justify="right")
    for c in classes:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            r.label, r.model, r.split, fmt(r.miou), fmt(r.tail_miou), *(fmt(r.per_class.get(c, [])) for c in classes)
        )
    return table


def run_compare(
    run_dirs: list[Path], split: str | None = None, model: str | None = None, console: Console | None = None
) -> list[CompareRow]:
    rows = collect_rows(run_dirs, split, model)
    (console or Console()).print(compare_table(rows))
    return rows
