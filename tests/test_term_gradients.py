"""benchmarks/term_gradients.py: per-term trunk gradients of a round's first steps, and the two negatives'."""

from __future__ import annotations

import math
import shutil

import pytest

from tests.conftest import TINY_RECIPE, load_benchmark


@pytest.fixture(scope="module")
def term_gradients():
    return load_benchmark("term_gradients")


def table(out: str) -> list[dict[str, float]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header[1:], map(float, line.strip("|").split("|")[1:]), strict=True)) for line in lines[1:]]


def test_the_round_trains_and_each_term_has_its_own_gradient(term_gradients, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = ["--run", str(run), "--config", str(TINY_RECIPE), "--steps", "3", "--window", "2"]
    term_gradients.main([*args, "--set", "selftrain.contrastive=true", "selftrain.pseudo_source=teacher"])
    rows = table(capsys.readouterr().out)
    assert len(rows) == 2  # steps 1-2 and 3
    for row in rows:
        assert row["grad supervised"] > 0 and row["grad contrastive"] > 0 and row["grad reliable"] > 0
        assert 0 < row["contrastive share"] < 1 + 1e-6  # the contrastive part of the whole trunk gradient
        assert -1 - 1e-6 <= row["cos(unrel, rel)"] <= 1 + 1e-6 and not math.isnan(row["cos(unrel, rel)"])
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # it writes nothing under the run
    with pytest.raises(SystemExit, match="no contrastive term"):
        term_gradients.main(args)
