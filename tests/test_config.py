"""Config precedence: defaults < run's config.yaml < recipe < command line (--set last)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from labelpipe.config import resolve_config
from labelpipe.errors import LabelpipeError


def test_precedence(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {steps: 11, lr: 0.5}\nseed: 3\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {steps: 22}\n")
    cfg = resolve_config(run, recipe, {"train": {"batch_size": 3}}, ["train.lr=0.25"])
    assert cfg.train.steps == 22  # recipe over the run's config
    assert cfg.train.lr == 0.25  # --set over everything
    assert cfg.train.batch_size == 3
    assert cfg.seed == 3  # kept from the run


def test_defaults_without_files(tmp_path):
    cfg = resolve_config(tmp_path / "missing")
    assert cfg.model.backbone == "resnet18" and cfg.pseudolabel.method == "dars"


def test_unknown_key_in_recipe_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {stpes: 3}\n")
    with pytest.raises(LabelpipeError, match="r.yaml.*train.stpes"):
        resolve_config(None, recipe)


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: [1,\n")
    with pytest.raises(LabelpipeError, match="invalid YAML"):
        resolve_config(None, recipe)


@pytest.mark.parametrize(
    "recipe", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "stages").glob("*.yaml"))
)
def test_shipped_recipes_validate(recipe):
    from tests.conftest import REPO

    resolve_config(None, REPO / "stages" / f"{recipe}.yaml")


def test_selftrain_settings_added_later_are_hashed_only_when_changed():
    from labelpipe.config import SelftrainConfig

    default = SelftrainConfig().fingerprint_fields()
    assert "rounds" not in default and "contrastive_r_l" not in default and "contrastive_r_h" not in default
    assert SelftrainConfig(rounds=5).fingerprint_fields() == default
    changed = SelftrainConfig(contrastive_r_h=10).fingerprint_fields()
    assert changed["contrastive_r_h"] == 10 and changed != default
    for name, default_value in SelftrainConfig.HASHED_WHEN_SET.items():  # the defaults are the fields'
        assert getattr(SelftrainConfig(), name) == default_value, name


def test_head_dropout_is_a_round_setting_hashed_when_set():
    from pydantic import ValidationError

    from labelpipe.config import SelftrainConfig

    assert "head_dropout" not in SelftrainConfig().fingerprint_fields()  # earlier rounds stay up to date
    assert SelftrainConfig(head_dropout=0.5).fingerprint_fields()["head_dropout"] == 0.5
    with pytest.raises(ValidationError):
        SelftrainConfig(head_dropout=1.0)


def test_round_overrides_give_each_round_its_settings_and_are_validated():
    from labelpipe.config import RunConfig

    config = RunConfig.model_validate(
        {
            "selftrain": {
                "rounds": 2,
                "pseudo_source": "teacher",
                "method": "entropy",
                "round_overrides": {2: {"pseudo_source": "stored", "method": "threshold", "pseudolabel": {"tau": 0.8}}},
            },
            "pseudolabel": {"tau": 0.9},
        }
    )
    first, second = config.for_round(1), config.for_round(2)
    assert first.selftrain.pseudo_source == "teacher" and first.pseudolabel.tau == 0.9
    assert second.selftrain.pseudo_source == "stored" and second.selftrain.method == "threshold"
    assert second.pseudolabel.tau == 0.8
    # A round's fingerprint holds its own settings: round 1 is the run without the overrides.
    plain = RunConfig.model_validate({"selftrain": {"rounds": 2, "pseudo_source": "teacher", "method": "entropy"}})
    assert first.selftrain.fingerprint_fields() == plain.selftrain.fingerprint_fields()
    assert "round_overrides" not in second.selftrain.fingerprint_fields()
    assert RunConfig().for_round(1) == RunConfig()
    for bad, message in (
        ({0: {"lr": 0.1}}, "numbered from 1"),
        ({2: {"rounds": 3}}, "cannot differ by round"),
        ({2: {"no_such_key": 1}}, "round 2: no_such_key"),
        ({2: {"pseudolabel": {"tau": 2}}}, "round 2: tau"),
        ({2: {"method": "nope"}}, "round 2"),
    ):
        with pytest.raises(ValidationError, match=message):
            RunConfig.model_validate({"selftrain": {"round_overrides": bad}})
