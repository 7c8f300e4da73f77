"""The pseudo-label generator registry: a generator registered from outside the package (this file) is a
``--method`` of the config, the CLI and the pseudolabel stage without any other change; the registry
refuses inconsistent entries."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labelpipe.config import PseudolabelConfig, SelftrainConfig
from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.registry import (
    Histogram,
    PseudoLabelGenerator,
    generator_names,
    get_generator,
    register_generator,
    unregister_generator,
)
from labelpipe.store.prediction_store import PredictionStore

TOY = "toy_top_conf"
SHAPE = (9, 13)


# ------------------------------------------------------------------------------------ the toy generator
# Keep the ``alpha`` fraction of all pixels with the highest confidence (one threshold for every class),
# weighted by their confidence: pass 1 histograms conf over all pixels, pass 2 compares and weights.
def toy_fit(hist: Float16Histogram, settings: Mapping[str, Any], prior: None) -> dict[str, Any]:
    rank = max(1, math.ceil(settings["alpha"] * hist.total()))
    return {"threshold": hist.kth_largest_overall(rank), "n_pixels": hist.total()}


def toy_label(params: Mapping[str, Any], piece: Mapping[str, np.ndarray], rng: Any) -> tuple[np.ndarray, np.ndarray]:
    keep = piece["conf"].astype(np.float64) >= params["threshold"]
    labels = np.where(keep, piece["label"], np.uint8(255)).astype(piece["label"].dtype)
    return labels, np.where(keep, piece["conf"], np.float16(0)).astype(np.float16)


TOY_GENERATOR = PseudoLabelGenerator(
    name=TOY,
    settings=("alpha",),
    histogram=Histogram("conf"),
    pass2_columns=("label", "conf"),
    fit=toy_fit,
    label=toy_label,
    weights=True,
)


@pytest.fixture()
def toy() -> Iterator[PseudoLabelGenerator]:
    register_generator(TOY_GENERATOR)
    yield TOY_GENERATOR
    unregister_generator(TOY)


def toy_in_memory(label: np.ndarray, conf: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The toy's rule on the whole store at once, by sorting."""
    descending = np.sort(conf.astype(np.float64))[::-1]
    threshold = descending[max(1, math.ceil(alpha * conf.size)) - 1]
    keep = conf.astype(np.float64) >= threshold
    return np.where(keep, label, 255).astype(np.uint8), np.where(keep, conf, 0).astype(np.float16), threshold


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """Five images from the public writer (label and conf only: the toy needs no other column)."""
    from labelpipe.store import PredictionWriter

    path = tmp_path / "predictions.h5"
    rng = np.random.default_rng(11)
    with PredictionWriter(path, ["a", "b", "c"]) as writer:
        for i in range(5):
            label = rng.integers(0, 3, SHAPE).astype(np.uint8)
            writer.add(f"img{i}", label=label, conf=rng.uniform(0.34, 1.0, SHAPE).astype(np.float16))
    return path


def run_cli(args: list[str]) -> int:
    from labelpipe.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 0


def read(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with PredictionStore(path) as labels:
        images = [labels[i] for i in labels.ids]
        return (
            labels.ids,
            np.concatenate([g["label"].ravel() for g in images]),
            np.concatenate([g["weight"].ravel() for g in images]),
        )


# ---------------------------------------------------------------------------------------------- tests
def test_a_registered_toy_generator_runs_through_the_cli_and_the_stage(toy, store, tmp_path):
    outs = {}
    for name, extra in {"default": [], "bands": ["--chunk-pixels", "20"]}.items():
        out = tmp_path / name
        args = ["pseudolabel", "--predictions", str(store), "--out", str(out), "--method", TOY, "--alpha", "0.3"]
        assert run_cli([*args, *extra]) == 0
        outs[name] = out
    ids, labels, weights = read(outs["default"] / "labels.h5")
    with PredictionStore(store) as predictions:
        assert ids == predictions.ids
        columns = [predictions.read(i, ("label", "conf")) for i in ids]
    label = np.concatenate([c["label"].ravel() for c in columns])
    conf = np.concatenate([c["conf"].ravel() for c in columns])
    expected, expected_weights, threshold = toy_in_memory(label, conf, 0.3)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(weights, expected_weights)  # weights=True: labels.h5 has the weight column
    assert 0.29 < np.mean(labels != 255) < 0.5  # the top 30% (more under float16 ties)

    report = json.loads((outs["default"] / "report.json").read_text())
    assert report["method"] == TOY
    assert report["params"] == {"threshold": threshold, "n_pixels": label.size}
    assert report["kept_fraction"] == pytest.approx(np.mean(labels != 255))
    # the stage's chunking is the driver's business: one-row bands give the same labels
    _, band_labels, band_weights = read(outs["bands"] / "labels.h5")
    np.testing.assert_array_equal(band_labels, labels)
    np.testing.assert_array_equal(band_weights, weights)
    # the fingerprinted inputs are the config's pseudolabel fields (fingerprint_fields()), the toy's included
    manifest = json.loads((outs["default"] / "manifest.json").read_text())
    assert manifest["inputs"]["method"] == TOY and manifest["inputs"]["alpha"] == 0.3


def test_the_config_accepts_exactly_the_registered_methods(tmp_path):
    assert TOY not in generator_names()
    for section in (PseudolabelConfig, SelftrainConfig):
        with pytest.raises(ValueError, match=f"unknown pseudo-label method '{TOY}'"):
            section(method=TOY)
    register_generator(TOY_GENERATOR)
    try:
        assert generator_names()[-1] == TOY
        assert PseudolabelConfig(method=TOY).method == TOY and SelftrainConfig(method=TOY).method == TOY
    finally:
        unregister_generator(TOY)
    with pytest.raises(ValueError, match="unknown pseudo-label method"):
        PseudolabelConfig(method=TOY)


def test_the_cli_refuses_an_unregistered_method_in_one_line(store, tmp_path, capsys):
    args = ["pseudolabel", "--predictions", str(store), "--out", str(tmp_path / "o"), "--method", TOY]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown pseudo-label method '{TOY}'" in err
    assert "dars" in err and not (tmp_path / "o").exists()


def test_the_cli_help_lists_the_registered_generators(capsys):
    assert run_cli(["pseudolabel", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in generator_names():
        assert name in text, name


def test_a_generator_that_needs_the_prior_is_refused_without_one(store, tmp_path, capsys):
    needy = PseudoLabelGenerator(**{**TOY_GENERATOR.__dict__, "needs_prior": True})
    register_generator(needy)
    try:
        args = ["pseudolabel", "--predictions", str(store), "--out", str(tmp_path / "o"), "--method", TOY]
        assert run_cli(args) == 2
    finally:
        unregister_generator(TOY)
    assert f"--method {TOY} needs the labeled class prior" in capsys.readouterr().err


def test_the_registry_refuses_inconsistent_entries():
    with pytest.raises(ValueError, match="registered twice"):
        register_generator(PseudoLabelGenerator(**{**get_generator("dars").__dict__, "random": False}))
    register_generator(get_generator("dars"))  # the same entry again is no change
    with pytest.raises(ValueError, match="must start with 'label'"):
        register_generator(PseudoLabelGenerator(**{**TOY_GENERATOR.__dict__, "pass2_columns": ("conf",)}))
    with pytest.raises(ValueError, match="generator name"):
        register_generator(PseudoLabelGenerator(**{**TOY_GENERATOR.__dict__, "name": "a b"}))
    assert TOY not in generator_names()
    with pytest.raises(ValueError, match=r"unknown pseudo-label method 'nope'; choose one of cbst, dars"):
        get_generator("nope")


def test_a_missing_required_setting_is_named():
    with pytest.raises(ValueError, match=f"method '{TOY}' needs alpha"):
        TOY_GENERATOR.select({"alpha": None, "tau": 0.9})
    assert TOY_GENERATOR.select({"alpha": 0.2, "tau": 0.9}) == {"alpha": 0.2}


def test_an_unregistered_method_in_settings_is_a_clean_error():
    from labelpipe.pseudo.labelling import Settings

    with pytest.raises(LabelpipeError, match="unknown pseudo-label method"):
        assert Settings(TOY, 0.2, 0.9, 0.2, None, 0, 1000).generator


def test_a_module_dropped_into_the_package_registers_itself(tmp_path, monkeypatch):
    """The README's recipe: a new module in ``labelpipe/pseudo/`` is found by the registry's scan, with
    no import added anywhere (here the package's search path gets a temporary folder)."""
    import sys

    import labelpipe.pseudo as package
    from labelpipe.pseudo import registry

    (tmp_path / "toy_dropped_in.py").write_text(
        "from labelpipe.pseudo.registry import PseudoLabelGenerator, register_generator\n"
        "from labelpipe.pseudo.threshold import threshold_pseudo_labels\n"
        "register_generator(PseudoLabelGenerator(\n"
        "    name='toy_dropped_in', settings=('tau',), pass2_columns=('label', 'conf'),\n"
        "    fit=lambda hist, settings, prior: {'tau': settings['tau']},\n"
        "    label=lambda params, piece, rng: (\n"
        "        threshold_pseudo_labels(piece['label'], piece['conf'], params['tau']), None),\n"
        "))\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_scanned", False)
    try:
        assert "toy_dropped_in" in generator_names()
        assert PseudolabelConfig(method="toy_dropped_in", tau=0.5).method == "toy_dropped_in"
    finally:
        unregister_generator("toy_dropped_in")
        sys.modules.pop("labelpipe.pseudo.toy_dropped_in", None)


def test_finding_the_generators_imports_only_generator_modules():
    """The registry imports every module of labelpipe.pseudo to find the built-ins, except the ones it lists
    as defining none: the labelling around them (the run's data set, h5py) is not loaded by a config check."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from labelpipe.pseudo.registry import generator_names\n"
        "generator_names()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('labelpipe.pseudo.', 'labelpipe.context', 'h5py'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert {"labelpipe.pseudo.dars", "labelpipe.pseudo.variance"} <= loaded  # the built-ins registered
    unwanted = {"labelpipe.pseudo.labelling", "labelpipe.pseudo.run_store", "labelpipe.context", "h5py"}
    assert not loaded & unwanted


def test_one_method_imports_its_own_module_only_and_the_list_keeps_its_order():
    """``get_generator("dars")`` imports ``labelpipe.pseudo.dars`` and no other generator's module (the
    pseudolabel command's start-up); listing the methods afterwards still scans them all, in module order."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import labelpipe.pseudo as package\n"
        "from labelpipe.pseudo.registry import generator_names, get_generator\n"
        "assert get_generator('dars').name == 'dars'\n"
        "first = sorted(m for m in sys.modules if m.startswith('labelpipe.pseudo.'))\n"
        "print(first)\n"
        "print(list(generator_names()))\n"
        "print(package.cbst_thresholds.__module__)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    loaded = set(json.loads(lines[0].replace("'", '"')))
    assert "labelpipe.pseudo.dars" in loaded
    assert not loaded & {f"labelpipe.pseudo.{m}" for m in ("cbst", "entropy", "threshold", "variance", "quality")}
    assert json.loads(lines[1].replace("'", '"')) == ["cbst", "dars", "entropy", "threshold", "variance"]
    assert lines[2] == "labelpipe.pseudo.cbst"  # the package's names resolve on first use


def test_an_unknown_method_is_still_refused_after_the_namesake_lookup():
    with pytest.raises(ValueError, match="unknown pseudo-label method 'labelling'.*dars"):
        get_generator("labelling")
    with pytest.raises(ValueError, match="unknown pseudo-label method 'no_such_method'"):
        get_generator("no_such_method")
