"""compare: several runs' evaluations in one table; runs that differ only in seed folded to mean +- std."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelpipe.config import RunConfig, config_to_yaml
from labelpipe.errors import LabelpipeError
from labelpipe.stages.compare import collect_rows, fmt
from tests.conftest import run_cli


def fake_run(root: Path, name: str, miou: float, seed: int = 0, split: str = "test", **sections) -> Path:
    """A run directory as `evaluate` leaves it: config.yaml and evaluate/pretrain/metrics.json."""
    run = root / name
    (run / "evaluate" / "pretrain").mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(RunConfig(seed=seed, **sections)))
    metrics = {
        "model": "pretrain",
        "split": split,
        "miou": miou,
        "tail_miou": miou / 2,
        "per_class_iou": {"road": miou + 0.1, "sign": None if seed == 1 else miou - 0.1},
    }
    (run / "evaluate" / "pretrain" / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_seeds_of_one_config_are_folded_and_other_configs_kept_apart(tmp_path):
    runs = [
        fake_run(tmp_path, "s0", 0.5, seed=0),
        fake_run(tmp_path, "other", 0.9, seed=0, train={"lr": 0.02}),  # another setting: its own row
        fake_run(tmp_path, "s1", 0.6, seed=1),
        fake_run(tmp_path, "s2", 0.7, seed=2, train={"num_workers": 3}),  # execution-only: still a seed
    ]
    rows = collect_rows(runs)
    assert [(len(r.runs), r.model) for r in rows] == [(3, "pretrain"), (1, "pretrain")]
    seeds, other = rows
    assert seeds.seeds == [0, 1, 2] and seeds.label.endswith("(3 seeds)")
    assert fmt(seeds.miou) == "60.0 ± 10.0"  # sample std of 0.5, 0.6, 0.7
    assert fmt(seeds.per_class["sign"]) == "50.0 ± 14.1"  # seed 1 has no IoU for the class: mean of two
    assert fmt(other.miou) == "90.0"


def test_the_same_seed_twice_is_not_a_repeat(tmp_path):
    rows = collect_rows([fake_run(tmp_path, "a", 0.5), fake_run(tmp_path, "b", 0.7)])
    assert [r.runs for r in rows] == [[str(tmp_path / "a")], [str(tmp_path / "b")]]


def test_split_filter_and_one_line_errors(tmp_path):
    a = fake_run(tmp_path, "a", 0.5, split="val")
    b = fake_run(tmp_path, "b", 0.6, seed=1, split="test")
    assert [r.runs for r in collect_rows([a], split="val")] == [[str(a)]]
    with pytest.raises(LabelpipeError, match=f"{a}: no evaluated model for --split test"):
        collect_rows([a, b], split="test")
    with pytest.raises(LabelpipeError, match="no such run directory"):
        collect_rows([tmp_path / "missing"])


def test_compare_command_prints_one_table(tmp_path, capsys):
    a, b = fake_run(tmp_path, "a", 0.5), fake_run(tmp_path, "b", 0.7, seed=1)
    assert run_cli(["compare", str(a), "--run", str(b)]) == 0
    out = capsys.readouterr().out
    assert "60.0 ± 14.1" in out and "(2 seeds)" in out and out.count("pretrain") == 1
    assert run_cli(["compare", str(a), "--split", "nope"]) == 2
