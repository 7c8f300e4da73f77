"""The console entry point: ``labelpipe pseudolabel --predictions`` without typer or pydantic, and the
same settings, fingerprint and labels as the typer command; everything else goes to the typer CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labelpipe.cli import _drop_none
from labelpipe.config import resolve_config
from labelpipe.entry import lean_pseudolabel_options, lean_settings, main
from labelpipe.pseudo.labelling import settings_from
from labelpipe.store.prediction_store import PredictionStore
from tests.conftest import REPO

CLASSES = 4
BASE = ["pseudolabel", "--predictions", "p.h5", "--out", "o"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from labelpipe.store import PredictionWriter

    path = tmp_path_factory.mktemp("entry") / "predictions.h5"
    rng = np.random.default_rng(0)
    with PredictionWriter(path, CLASSES) as writer:
        for i in range(3):
            label = rng.choice(CLASSES, size=(12, 20), p=[0.6, 0.2, 0.15, 0.05]).astype(np.uint8)
            conf = np.clip(1.0 - rng.exponential(0.05, label.shape), 1 / CLASSES, 1).astype(np.float16)
            writer.add(f"img{i}", label=label, conf=conf)
    return path


def typer_settings(args: list[str]):
    """What the typer command resolves for ``args`` (``labelpipe.cli.pseudolabel`` with --predictions)."""
    opts = lean_pseudolabel_options(args)
    assert opts is not None
    settings = {
        "method": opts.get("method"),
        "alpha": opts.get("alpha"),
        "tau": opts.get("tau"),
        "export": opts.get("export"),
        "chunk_pixels": opts.get("chunk_pixels"),
        "plots": opts.get("plots", False),
    }
    return settings_from(resolve_config(None, None, _drop_none({"seed": opts.get("seed"), "pseudolabel": settings})))


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--method", "cbst", "--alpha", "0.35", "--seed", "4"],
        ["--method=threshold", "--tau=0.7", "--chunk-pixels", "1000", "--plots"],
        ["--method", "entropy", "--export", "png", "--no-plots", "--force", "--debug"],
        ["--method", "dars", "--alpha", "1", "--prior", "x.npy", "--prior-from", "masks"],
    ],
)
def test_lean_settings_and_fingerprint_equal_the_typer_commands(extra):
    args = [*BASE, *extra]
    lean, full = lean_settings(lean_pseudolabel_options(args)), typer_settings(args)
    assert lean == full
    assert lean.fingerprint_fields() == full.fingerprint_fields()


@pytest.mark.parametrize(
    "args",
    [
        ["pretrain", "--predictions", "p.h5", "--out", "o"],  # another command
        ["pseudolabel", "--out", "o"],  # a run's store, not --predictions
        ["pseudolabel", "--predictions", "p.h5"],  # no --out: the typer command says what is missing
        [*BASE, "--help"],
        [*BASE, "--config", "stages/demo.yaml"],
        [*BASE, "--set", "pseudolabel.dars_sampling=exact_count"],
        [*BASE, "--run", "runs/x"],
        [*BASE, "--alpha"],  # an option without its value
        [*BASE, "--prior", "--force"],
        [*BASE, "--alpha", "0"],  # out of range: the typer command reports it
        [*BASE, "--alpha", "nan"],
        [*BASE, "--tau", "1.5"],
        [*BASE, "--seed", "-1"],
        [*BASE, "--seed", "1.5"],
        [*BASE, "--chunk-pixels", "0"],
        [*BASE, "--export", "jpg"],
        [*BASE, "--method", "nonsense"],
        [*BASE, "--force=yes"],
        [*BASE, "extra-argument"],
    ],
)
def test_anything_else_goes_to_the_typer_cli(args):
    assert lean_pseudolabel_options(args) is None


def test_bad_values_get_the_typer_commands_error(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pseudolabel", "--predictions", str(store), "--out", str(tmp_path / "o"), "--alpha", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "alpha" in err and err.count("\n") == 1, err


def test_lean_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["pseudolabel", "--predictions", str(tmp_path / "missing.h5"), "--out", str(out), "--method", "cbst"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.h5" in err and err.count("\n") == 1, err
    assert not (out / "labels.h5").exists()


def run_labelpipe(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``args`` through ``module``'s ``main`` in a fresh process, which then lists the CLI stack it loaded."""
    code = (
        "import sys\n"
        f"from {module} import main\n"
        f"main({args!r})\n"
        "print('LOADED', [m for m in ('typer', 'pydantic', 'rich', 'torch') if m in sys.modules])\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_lean_path_writes_what_the_typer_command_writes_without_the_cli_stack(store, tmp_path):
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps([0.5, 0.3, 0.15, 0.05]))

    def args(out: Path) -> list[str]:
        return ["pseudolabel", "--predictions", str(store), "--out", str(out), "--prior", str(prior), "--alpha", "0.4"]

    lean = run_labelpipe("labelpipe.entry", [*args(tmp_path / "lean"), "--seed", "3"])
    full = run_labelpipe("labelpipe.cli", [*args(tmp_path / "full"), "--seed", "3"])
    assert lean.returncode == 0 and full.returncode == 0, lean.stderr[-2000:] + full.stderr[-2000:]
    assert "LOADED []" in lean.stdout
    assert "'typer'" in full.stdout and "'pydantic'" in full.stdout
    assert "pseudo-labels: dars" in lean.stdout and "┏" in lean.stdout  # the printed table

    for name in ("lean", "full"):
        assert (tmp_path / name / "labels.h5").is_file()
    with PredictionStore(tmp_path / "lean" / "labels.h5") as a, PredictionStore(tmp_path / "full" / "labels.h5") as b:
        assert a.ids == b.ids
        for image_id in a.ids:
            np.testing.assert_array_equal(a.read(image_id, ("label",))["label"], b.read(image_id, ("label",))["label"])
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("lean", "full")]
    assert reports[0]["params"] == reports[1]["params"] and reports[0]["per_class"] == reports[1]["per_class"]
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("lean", "full")]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]

    # The same fingerprint: the typer command finds the lean path's labels up to date, and back.
    again = run_labelpipe("labelpipe.cli", [*args(tmp_path / "lean"), "--seed", "3"])
    assert again.returncode == 0 and "up to date" in again.stdout
    again = run_labelpipe("labelpipe.entry", [*args(tmp_path / "full"), "--seed", "3"])
    assert again.returncode == 0 and "up to date" in again.stdout and "LOADED []" in again.stdout


def test_the_fast_exit_steps_aside_while_an_hdf5_file_is_open(tmp_path, monkeypatch):
    """``exit_without_teardown`` skips the interpreter's teardown only when nothing is left to finish: with
    an HDF5 file still open (its last writes would be lost) it returns and the normal exit runs."""
    import h5py

    from labelpipe.entry import exit_without_teardown

    monkeypatch.delitem(sys.modules, "torch", raising=False)  # only the open file may hold it back here
    with h5py.File(tmp_path / "open.h5", "w") as fh:
        fh["x"] = np.arange(3)
        exit_without_teardown()  # returns: a file is open (were it to exit, pytest would stop here)
    assert (tmp_path / "open.h5").is_file()
