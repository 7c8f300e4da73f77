"""One grammar: --run everywhere a run is read, the stage options on every stage command, an example in every
--help."""

from __future__ import annotations

import json

import pytest
import typer

from labelpipe.cli import app
from tests.conftest import TINY_RECIPE, run_cli

STAGE_COMMANDS = ("pretrain", "evaluate", "predict", "pseudolabel", "selftrain", "run", "export")
RUN_READERS = (*STAGE_COMMANDS, "status", "report", "compare", "segment")


def commands() -> dict[str, typer.core.TyperCommand]:
    group = typer.main.get_command(app)
    out = dict(group.commands)
    for name, sub in group.commands["data"].commands.items():
        out[f"data {name}"] = sub
    del out["data"]
    return out


def options(command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def test_every_stage_command_takes_the_stage_options_and_every_reader_takes_run():
    cmds = commands()
    for name in STAGE_COMMANDS:
        missing = {"--data", "--config", "--set", "--seed", "--device"} - options(cmds[name])
        assert not missing, f"{name} lacks {missing}"
    for name in RUN_READERS:
        assert "--run" in options(cmds[name]), name


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_help_ends_with_an_example(name, capsys):
    assert run_cli([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    example = out.rfind(f"Example: labelpipe {name}")
    assert example > out.rfind("Show this message and exit"), out[-400:]


@pytest.mark.slow
def test_status_and_export_take_the_run_as_argument_or_option(pretrained_run, tmp_path, capsys):
    assert run_cli(["status", "--run", str(pretrained_run)]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert run_cli(["status", str(pretrained_run)]) == 0
    assert run_cli(["status", str(pretrained_run), "--run", str(tmp_path)]) == 2
    assert "run given twice" in capsys.readouterr().err
    # export --set: the check runs at the crop the resolved config gives
    out = tmp_path / "m.pt"
    args = ["export", "--run", str(pretrained_run), "--out", str(out), "--set", "train.crop_size=40"]
    assert run_cli(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["check"]["sample_shapes"][0] == [1, 3, 40, 40]
    assert run_cli(["export", "--run", str(pretrained_run), "--set", "train.nope=1"]) == 2


def test_run_takes_the_recipe_as_argument_or_config_not_two_different_ones(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("train: {steps: 1}\n")
    assert run_cli(["run", str(TINY_RECIPE), "--config", str(other), "--run", str(tmp_path / "r")]) == 2
    assert "recipe given twice" in capsys.readouterr().err
