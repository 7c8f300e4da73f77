"""Every shipped DigitScapes recipe runs end to end (`labelpipe run stages/X.yaml`), shrunk to seconds.

Each recipe keeps its own pipeline, protocol, model, losses, pseudo-label method, `select` candidates and round
overrides; only the sizes are overridden (the tiny build, a few steps, small batches and memory banks). What this
catches is a recipe that validates but does not run: a setting no stage reads the way the recipe assumes, a
`select` whose decision step has no validation, a round whose method and loss do not fit together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelpipe.config import resolve_config
from tests.conftest import REPO, run_cli


def _embedded(recipe: Path) -> bool:
    """Whether the recipe trains on the embedded DigitScapes (the others need a data set on disk)."""
    data = resolve_config(None, recipe).data
    return data.root is None and data.kind is None


DIGITSCAPES_RECIPES = sorted(p.stem for p in (REPO / "stages").glob("*.yaml") if p.stem != "tiny" and _embedded(p))

SHRUNK = [
    "data.digitscapes.size=tiny",
    "train.steps=4",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    "train.val_limit=8",
    "predict.batch_size=16",
    "selftrain.steps=2",
    "selftrain.memory_capacity=500",
    "selftrain.contrastive_anchors=16",
    "selftrain.contrastive_negatives=8",
    "evaluate.batch_size=16",
    "evaluate.num_samples=2",
]


def test_the_issue_recipes_are_among_them():
    assert {"demo", "digitscapes_da", "digitscapes_dars", "digitscapes_u2pl", "digitscapes_rectify"} <= set(
        DIGITSCAPES_RECIPES
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", DIGITSCAPES_RECIPES)
def test_a_shipped_recipe_runs_end_to_end(recipe, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    path = REPO / "stages" / f"{recipe}.yaml"
    args = ["run", str(path), "--run", str(run), "--device", "cpu"]
    for setting in SHRUNK:
        args += ["--set", setting]
    assert run_cli(args) == 0, capsys.readouterr().err
    config = resolve_config(None, path)
    evaluated = sorted(p.parent.name for p in (run / "evaluate").glob("*/metrics.json"))
    # The baseline, and the last round when the recipe self-trains.
    last = [f"round-{config.selftrain.rounds}"] if "selftrain" in config.pipeline else []
    assert evaluated == ["pretrain", *last]
    for name in evaluated:
        metrics = json.loads((run / "evaluate" / name / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0
    assert (run / "report.html").is_file()
    if config.select is not None:
        chosen = json.loads((run / "select" / "selection.json").read_text())
        assert chosen["chosen"] in config.select.candidates
    # A second run finds everything up to date and trains nothing again.
    model = run / "pretrain" / "model.safetensors"
    before = model.stat().st_mtime_ns if model.exists() else None
    assert run_cli(args) == 0
    assert "up to date" in capsys.readouterr().out
    if before is not None:
        assert model.stat().st_mtime_ns == before
