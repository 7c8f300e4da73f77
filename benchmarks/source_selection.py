"""The DA rows of a recipe that chooses its source on target_val (``select`` in ``stages/digitscapes_da.yaml`` and
``stages/demo.yaml``), from the records of ``benchmarks/selftrain_matrix.py`` run once per source style.

``select`` trains the source-only model on each source style and keeps the one whose pretrain ends with the higher
validation mIoU (the last point of its target_val curve, the first ``train.val_limit`` images); the stages after it
run from that model. A pretrain does not depend on which other styles were tried, so per build and training seed the
recipe's rows are the chosen style's own matrix rows: this script makes the same choice from the records'
``val_curve`` and prints, per DigitScapes build, the choice on every seed and the chosen rows' target_test figures
beside each style's own (mean +- std over seeds, gains paired by seed).

    python benchmarks/source_selection.py benchmarks/results/selftrain_matrix-session28.jsonl \\
        benchmarks/results/selftrain_matrix-session36-blended.jsonl ...

Only the records of a style's default (``blended`` at its own share) take part; every choice is made on target_val.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

STYLES = ("textured", "blended")  # the candidates of the recipes' ``select``, in their order (ties: the first)
BASELINE = "baseline-plateau"
ROWS = ("adabn-plateau", "plateau-online-lr4e-3-3000", "plateau-control-3000")
ORACLES = ("oracle-plateau", "oracle-plateau-6000")

Build = tuple[int, str]  # (DigitScapes seed, blend)


def read_records(paths: list[Path]) -> tuple[dict, dict]:
    """``(rows, oracles)``: rows[build][style][config][training seed] = record (a later file wins) and
    oracles[build][config][training seed] = record (the oracle trains on the target alone: any style's)."""
    rows: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    oracles: dict = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            data = record.get("data") or {}
            build = (int(data.get("digitscapes_seed", 0)), data.get("blend", "alpha"))
            if record["config"] in ORACLES:
                oracles[build][record["config"]][record["seed"]] = record
                continue
            if record.get("protocol") != "da" or data.get("difference_share") is not None:
                continue
            style = data.get("source_style", "textured")
            if style in STYLES:
                rows[build][style][record["config"]][record["seed"]] = record
    return rows, oracles


def validation_at(record: dict, decide_at: float = 1.0) -> tuple[int, float]:
    """What ``select`` compares: ``(step, mIoU)`` of the pretrain's last validation at or before ``decide_at``
    of its steps (``select.decide_at``; 1: the last validation)."""
    curve = record.get("val_curve")
    if not curve:
        raise ValueError(f"{record.get('run', record['config'])}: no val_curve to choose by")
    limit = decide_at * curve[-1][0]
    before = [(int(step), float(miou)) for step, miou in curve if step <= limit]
    if not before:
        raise ValueError(
            f"{record.get('run', record['config'])}: no validation in the first {decide_at:g} of the steps"
        )
    return before[-1]


def last_validation(record: dict) -> float:
    """The pretrain's last validation mIoU (``select`` with ``decide_at`` 1)."""
    return validation_at(record)[1]


def choices(rows_of_build: dict, decide_at: float = 1.0) -> dict[int, str]:
    """Per training seed with a baseline of every style, the style ``select`` keeps."""
    baselines = {style: rows_of_build[style][BASELINE] for style in STYLES}
    seeds = sorted(set.intersection(*(set(b) for b in baselines.values())))
    return {seed: max(STYLES, key=lambda style: validation_at(baselines[style][seed], decide_at)[1]) for seed in seeds}


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    a = 100 * np.asarray(values)
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.1f} +- {std:.1f} ({len(a)})"


def _gain(per_seed: dict[int, dict], key: str, reference: str) -> str:
    pairs = [(r[key], r[reference]) for r in per_seed.values() if key in r and reference in r]
    return _stat([a["test_miou"] - b["test_miou"] for a, b in pairs])


def build_table(build: Build, rows_of_build: dict, oracles_of_build: dict, decide_at: float = 1.0) -> list[str]:
    chosen = choices(rows_of_build, decide_at)
    final = choices(rows_of_build)
    when = "last target_val" if decide_at >= 1 else f"last target_val at or before {decide_at:g} of the steps"
    lines = [f"DigitScapes seed {build[0]} / {build[1]}: choice per training seed ({when} of each pretrain)"]
    for seed, style in chosen.items():
        at = {s: validation_at(rows_of_build[s][BASELINE][seed], decide_at) for s in STYLES}
        scores = ", ".join(f"{s} {100 * miou:.1f} (step {step})" for s, (step, miou) in at.items())
        same = (
            ""
            if decide_at >= 1
            else (
                " (the final validations agree)"
                if final[seed] == style
                else f" (the final validations choose {final[seed]})"
            )
        )
        lines.append(f"- seed {seed}: {scores} -> {style}{same}")
    oracle = {
        k: np.mean([r["test_miou"] for r in oracles_of_build[k].values()]) for k in ORACLES if oracles_of_build.get(k)
    }
    header = ["source", "source-only", "of the oracle (" + " / ".join(oracle) + ")", "AdaBN", "round"]
    header += ["round - source-only", "round - AdaBN", "round - control"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, pick in [("chosen on target_val (`select`)", None), *[(s, s) for s in STYLES]]:
        per_seed: dict[int, dict] = {}
        for seed, style in chosen.items():
            source = rows_of_build[pick or style]
            per_seed[seed] = {k: source[k][seed] for k in (BASELINE, *ROWS) if seed in source[k]}
        base = [r[BASELINE]["test_miou"] for r in per_seed.values() if BASELINE in r]
        share = " / ".join(f"{100 * np.mean(base) / value:.0f} %" for value in oracle.values()) if base else "-"
        cells = [_stat(base), share]
        cells += [_stat([r[k]["test_miou"] for r in per_seed.values() if k in r]) for k in ROWS[:2]]
        cells += [
            _gain(per_seed, ROWS[1], BASELINE),
            _gain(per_seed, ROWS[1], ROWS[0]),
            _gain(per_seed, ROWS[1], ROWS[2]),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, value in oracle.items():
        lines.append(f"\nOracle `{key}`: {100 * value:.1f} (mean over {len(oracles_of_build[key])} seeds).")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="results.jsonl files of selftrain_matrix.py")
    parser.add_argument(
        "--decide-at", type=float, default=1.0, help="select.decide_at: choose at that fraction of the steps"
    )
    args = parser.parse_args(argv)
    rows, oracles = read_records(args.records)
    for build in sorted(rows):
        if all(rows[build][style][BASELINE] for style in STYLES):
            print("\n".join(build_table(build, rows[build], oracles[build], args.decide_at)), end="\n\n")


if __name__ == "__main__":
    main()
