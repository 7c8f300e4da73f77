"""``select``: the pretrain trains one model per candidate, keeps the one the validation split prefers, and every
later stage and command runs with the chosen candidate's settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from labelpipe.config import SELECTION_FILE, resolve_config, validate
from labelpipe.errors import LabelpipeError
from labelpipe.store.run_summary import collect
from tests.conftest import REPO, TINY_RECIPE, run_cli


def _recipe(tmp_path, candidates: dict, pipeline: str = "[pretrain, evaluate]"):
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["select"] = {"candidates": candidates}
    raw["pipeline"] = yaml.safe_load(pipeline)
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_select_config_is_checked():
    with pytest.raises(LabelpipeError, match="at least two candidates"):
        validate({"select": {"candidates": {"a": {}}}}, "r.yaml")
    with pytest.raises(LabelpipeError, match="names a folder"):
        validate({"select": {"candidates": {"a/b": {}, "c": {}}}}, "r.yaml")
    with pytest.raises(LabelpipeError, match="sets selftrain; a candidate sets data, model, train"):
        validate({"select": {"candidates": {"a": {"selftrain": {"lr": 1.0}}, "b": {}}}}, "r.yaml")
    config = validate(
        {"train": {"lr": 0.5, "steps": 7}, "select": {"candidates": {"a": {"train": {"lr": 0.1}}, "b": {}}}}, "r.yaml"
    )
    a = config.candidate("a")
    assert (a.train.lr, a.train.steps, a.select) == (0.1, 7, None)  # the candidate's over the recipe's, the rest kept
    assert config.candidate("b").train.lr == 0.5
    with pytest.raises(LabelpipeError, match="no candidate 'c'"):
        config.candidate("c")
    with pytest.raises(LabelpipeError, match=r"select candidate a: train.lr"):
        validate({"select": {"candidates": {"a": {"train": {"lr": "fast"}}, "b": {}}}}, "r.yaml").candidate("a")


@pytest.mark.slow
def test_run_trains_every_candidate_and_continues_with_the_best(data_cache, tmp_path, capsys):
    # Two learning rates: the tiny pretrain's validation tells them apart; the test asserts the rule, not the winner.
    recipe = _recipe(tmp_path, {"slow": {"train": {"lr": 0.0001}}, "fast": {"train": {"lr": 0.01}}})
    run = tmp_path / "run"
    args = ["run", str(recipe), "--run", str(run), "--device", "cpu"]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    record = json.loads((run / SELECTION_FILE).read_text())
    scores = {
        name: json.loads((run / "select" / name / "pretrain/metrics.json").read_text())["miou"]
        for name in record["scores"]
    }
    assert record["scores"] == pytest.approx(scores) and set(scores) == {"slow", "fast"}
    chosen = max(scores, key=scores.get)
    assert record["chosen"] == chosen and f"chosen: {chosen}" in out
    # The run's pretrain is the chosen candidate's, and what later commands inherit is the chosen settings.
    installed = json.loads((run / "pretrain/manifest.json").read_text())
    assert (
        installed["fingerprint"]
        == json.loads((run / "select" / chosen / "pretrain/manifest.json").read_text())["fingerprint"]
    )
    lr = {"slow": 0.0001, "fast": 0.01}[chosen]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == lr
    assert resolve_config(run).train.lr == lr
    resolved = resolve_config(run, recipe)
    assert (resolved.select, resolved.train.lr) == (None, lr)
    assert json.loads((run / "evaluate/pretrain/metrics.json").read_text())["model"] == "pretrain"
    # Again: nothing is retrained or copied.
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")}
    assert run_cli(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")} == mtimes
    # A candidate changed: that one retrains, the other stays, and the choice is made again.
    other = "fast" if chosen == "slow" else "slow"
    recipe = _recipe(
        tmp_path, {"slow": {"train": {"lr": 0.0001}}, "fast": {"train": {"lr": 0.01}}, "mid": {"train": {"lr": 0.001}}}
    )
    assert run_cli(["run", str(recipe), "--run", str(run), "--device", "cpu"]) == 0
    record = json.loads((run / SELECTION_FILE).read_text())
    assert set(record["scores"]) == {"slow", "fast", "mid"}
    assert (run / "select" / other / "pretrain/model.safetensors").stat().st_mtime_ns == mtimes[
        run / "select" / other / "pretrain/model.safetensors"
    ]
    best = max(record["scores"], key=record["scores"].get)
    assert record["chosen"] == best
    assert (
        json.loads((run / "pretrain/manifest.json").read_text())["fingerprint"]
        == json.loads((run / "select" / best / "pretrain/manifest.json").read_text())["fingerprint"]
    )


@pytest.mark.slow
def test_equal_candidates_keep_the_first_and_the_choice_reaches_selftrain(data_cache, tmp_path):
    # Two candidates with the same settings score the same: the first listed is kept. The source style
    # the choice carries is what the self-training round trains its labeled batches on.
    same = {"data": {"digitscapes": {"source_style": "smooth"}}}
    recipe = _recipe(tmp_path, {"first": same, "second": same}, "[pretrain, selftrain]")
    run = tmp_path / "run"
    assert run_cli(["run", str(recipe), "--run", str(run), "--device", "cpu", "--set", "selftrain.rounds=1"]) == 0
    record = json.loads((run / SELECTION_FILE).read_text())
    assert record["scores"]["first"] == record["scores"]["second"] and record["chosen"] == "first"
    assert (run / "selftrain/round-1/train/model.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())  # written again when the round started
    assert saved["data"]["digitscapes"]["source_style"] == "smooth" and saved.get("select") is None


def test_decide_at_picks_the_last_validation_in_that_fraction_of_the_steps():
    def step(decide_at, steps, val_every):
        config = validate(
            {
                "train": {"steps": steps, "val_every": val_every},
                "select": {"decide_at": decide_at, "candidates": {"a": {}, "b": {}}},
            },
            "r.yaml",
        )
        return config.select.decision_step(config.train)

    assert step(1.0, 1600, 250) == 1600  # the final validation, whatever val_every
    assert step(0.5, 1600, 250) == 750
    assert step(0.5, 3000, 250) == 1500
    assert step(0.5, 6, 3) == 3
    with pytest.raises(LabelpipeError, match=r"select.decide_at=0.1: no validation .* lower train.val_every"):
        step(0.1, 1600, 250)
    with pytest.raises(LabelpipeError, match="decide_at"):
        validate({"select": {"decide_at": 0, "candidates": {"a": {}, "b": {}}}}, "r.yaml")


@pytest.mark.slow
def test_an_early_choice_pauses_the_others_and_trains_the_chosen_one_to_the_end(data_cache, tmp_path, capsys):
    # Tiny: 6 steps, a validation every 3: decide_at 0.5 compares the candidates at step 3. The chosen candidate
    # resumes its own run, so its model is bit-identical to a full-length pretrain of its settings, also when
    # the process is killed while the chosen one trains on (SIGKILL after step 5, the last checkpoint at 4).
    candidates = {"slow": {"train": {"lr": 0.0001}}, "fast": {"train": {"lr": 0.01}}}
    raw = yaml.safe_load(_recipe(tmp_path, candidates).read_text())
    raw["select"]["decide_at"] = 0.5
    recipe = tmp_path / "early.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(recipe), "--run", str(run), "--device", "cpu"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABELPIPE_TEST_KILL")}
    killed = subprocess.run(
        [sys.executable, "-m", "labelpipe", *args],
        env={**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LABELPIPE_TEST_KILL_AFTER_STEP": "5"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / SELECTION_FILE).exists()
    assert run_cli(args) == 0
    assert "resuming pretrain from step 4" in capsys.readouterr().out
    record = json.loads((run / SELECTION_FILE).read_text())
    assert (record["decide_at"], record["step"]) == (0.5, {"slow": 3, "fast": 3})
    for name in candidates:
        log = [json.loads(line) for line in (run / "select" / name / "pretrain/log.jsonl").read_text().splitlines()]
        assert record["scores"][name] == next(r["val_miou"] for r in log if r["step"] == 3 and "val_miou" in r)
    chosen = record["chosen"]
    assert chosen == max(record["scores"], key=record["scores"].get)
    other = "fast" if chosen == "slow" else "slow"
    paused = json.loads((run / "select" / other / "pretrain/manifest.json").read_text())
    assert (paused["status"], paused["paused_at"]) == ("paused", 3)
    assert torch.load(run / "select" / other / "pretrain/checkpoint.pt", weights_only=True)["step"] == 3
    assert not (run / "select" / other / "pretrain/model.safetensors").exists()
    done = json.loads((run / "select" / chosen / "pretrain/manifest.json").read_text())
    assert done["status"] == "done"
    row = next(r for r in collect(run) if r["stage"] == f"select/{other}/pretrain")  # what `labelpipe status` shows
    assert row["status"] == "paused" and row["note"].startswith("paused at step 3")
    capsys.readouterr()

    reference = tmp_path / "reference"
    lr = candidates[chosen]["train"]["lr"]
    tiny = ["pretrain", "--config", str(TINY_RECIPE), "--run", str(reference), "--device", "cpu"]
    assert run_cli([*tiny, "--set", f"train.lr={lr}"]) == 0
    a = load_file(str(reference / "pretrain/model.safetensors"))
    b = load_file(str(run / "pretrain/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Again: the choice stands, nothing trains, the paused candidate stays paused.
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("checkpoint.pt")}
    assert run_cli(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("checkpoint.pt")} == mtimes
    # Deciding at the end instead: the paused candidate trains on to its end, and the choice is made again.
    raw["select"]["decide_at"] = 1.0
    recipe.write_text(yaml.safe_dump(raw))
    assert resolve_config(run, recipe).select is not None  # the recorded choice no longer applies
    assert run_cli(args) == 0
    assert "resuming pretrain from step 3" in capsys.readouterr().out
    record = json.loads((run / SELECTION_FILE).read_text())
    assert record["step"] == {"slow": 6, "fast": 6}
    assert json.loads((run / "select" / other / "pretrain/manifest.json").read_text())["status"] == "done"
