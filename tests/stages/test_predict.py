"""predict: a store of every unlabeled image with the columns of ALGORITHMS.md section 1, consistent with the
model; skipped when up to date; temperature scaling and top-k; a SIGKILLed run resumes to the same store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labelpipe.store.prediction_store import PredictionStore
from tests.conftest import REPO, TINY_RECIPE

SMALL_PARTS = ["--set", "predict.batch_size=4", "--set", "predict.images_per_part=4"]


def predict_args(run: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu", *extra]


def labelpipe(args: list[str]) -> None:
    from labelpipe.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"labelpipe {' '.join(args)} exited {exc.code}"


def copy_run(pretrained_run: Path, dst: Path) -> Path:
    """A private copy: the session's pretrained run stays as it is."""
    shutil.copytree(pretrained_run, dst)
    return dst


def model_and_samples(run: Path):
    """The run's model, its data set and the unlabeled samples, opened as the stage opens them."""
    from labelpipe.config import resolve_config
    from labelpipe.context import load_trained_model, open_context
    from labelpipe.runtime import Runtime

    ctx = open_context(resolve_config(run, TINY_RECIPE), run, Runtime(device=torch.device("cpu")))
    _, model, _ = load_trained_model(ctx, None)
    return ctx, model, ctx.source.split(ctx.roles["unlabeled"])


def reference_columns(main: np.ndarray, aux: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """The section 1 formulas in float64 numpy, from (C, H, W) logits: independent of ``pixel_columns``."""

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(0)
        return z - np.log(np.exp(z).sum(0))

    logp, logp_aux = log_softmax(main.astype(np.float64)), log_softmax(aux.astype(np.float64))
    p = np.exp(logp)
    return {
        "label": main.argmax(0),
        "conf": p.max(0),
        "entropy": -(p * logp).sum(0),
        "variance": (p * (logp - logp_aux)).sum(0),
    }


@pytest.fixture(scope="module")
def predicted(pretrained_run, tmp_path_factory) -> Path:
    run = copy_run(pretrained_run, tmp_path_factory.mktemp("predict") / "run")
    labelpipe(predict_args(run))
    return run


def test_store_holds_every_unlabeled_image_with_the_documented_columns(predicted):
    from labelpipe import __version__

    ctx, _, samples = model_and_samples(predicted)
    manifest = json.loads((predicted / "predict" / "manifest.json").read_text())
    assert manifest["status"] == "done" and not (predicted / "predict" / "parts").exists()
    with PredictionStore(predicted / "predict" / "predictions.h5", ctx.source.num_classes) as store:
        assert store.ids == [s.id for s in samples] and len(store) > 0
        assert store.attrs["classes"] == ctx.source.classes
        assert store.attrs["temperature"] == 1.0
        assert store.attrs["model_sha256"] == manifest["inputs"]["weights_sha256"]
        assert store.attrs["labelpipe_version"] == __version__
        assert store.columns == ["label", "conf", "entropy", "variance"]
        C = ctx.source.num_classes
        for image_id, shape in zip(store.ids, store.shapes(), strict=True):
            columns = store[image_id]
            assert set(columns) == {"label", "conf", "entropy", "variance"}
            assert columns["label"].dtype == np.uint8 and columns["label"].shape == shape
            assert int(columns["label"].max()) < C
            for name in ("conf", "entropy", "variance"):
                assert columns[name].dtype == np.float16 and columns[name].shape == shape, name
            conf = columns["conf"].astype(np.float64)
            assert conf.min() >= np.float16(1 / C) and conf.max() <= 1.0
            assert columns["entropy"].min() >= 0 and columns["entropy"].max() <= np.float16(np.log(C))
            assert columns["variance"].min() >= 0


def test_columns_agree_with_the_models_logits(predicted):
    from labelpipe.inference.loop import iterate_predictions

    ctx, model, samples = model_and_samples(predicted)
    with PredictionStore(predicted / "predict" / "predictions.h5") as store:
        batch = next(
            iterate_predictions(model, ctx.source, samples[:3], torch.device("cpu"), ctx.config.train.crop_size, 3)
        )
        for image_id, main, aux in zip(batch.ids, batch.main, batch.aux, strict=True):
            expected = reference_columns(main.numpy(), aux.numpy(), 1.0)
            stored = store[image_id]
            np.testing.assert_array_equal(stored["label"], expected["label"])
            for name in ("conf", "entropy", "variance"):  # float16: 11 significant bits
                np.testing.assert_allclose(
                    stored[name].astype(np.float64), expected[name], rtol=2e-3, atol=1e-4, err_msg=name
                )


def test_second_run_is_skipped_when_up_to_date(predicted, capsys):
    store = predicted / "predict" / "predictions.h5"
    before = store.stat().st_mtime_ns
    labelpipe(predict_args(predicted))
    assert "predict: up to date" in capsys.readouterr().out
    assert store.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def calibrated_topk(pretrained_run, tmp_path_factory) -> Path:
    run = copy_run(pretrained_run, tmp_path_factory.mktemp("predict-auto") / "run")
    labelpipe(predict_args(run, "--temperature", "auto", "--topk", "3"))
    return run


@pytest.mark.slow
def test_temperature_auto_records_the_fit_and_uses_it(calibrated_topk):
    manifest = json.loads((calibrated_topk / "predict" / "manifest.json").read_text())
    summary = manifest["summary"]
    for key in ("nll_before", "nll_after", "ece_before", "ece_after", "temperature"):
        assert np.isfinite(summary[key]), key
    assert summary["nll_after"] <= summary["nll_before"]
    t = summary["temperature"]
    assert t != 1.0
    ctx, model, samples = model_and_samples(calibrated_topk)
    from labelpipe.inference.loop import iterate_predictions

    batch = next(
        iterate_predictions(model, ctx.source, samples[:1], torch.device("cpu"), ctx.config.train.crop_size, 1)
    )
    expected = reference_columns(batch.main[0].numpy(), batch.aux[0].numpy(), t)
    with PredictionStore(calibrated_topk / "predict" / "predictions.h5") as store:
        assert store.attrs["temperature"] == pytest.approx(t)
        assert store.attrs["calibration"]["nll_after"] == summary["nll_after"]
        stored = store[samples[0].id]
        np.testing.assert_allclose(stored["conf"].astype(np.float64), expected["conf"], rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(stored["entropy"].astype(np.float64), expected["entropy"], rtol=2e-3, atol=1e-4)


@pytest.mark.slow
def test_topk_adds_sorted_probabilities_and_classes(calibrated_topk):
    with PredictionStore(calibrated_topk / "predict" / "predictions.h5", require=("topk_prob", "topk_class")) as store:
        assert store.columns[-2:] == ["topk_prob", "topk_class"]
        for image_id, (h, w) in list(zip(store.ids, store.shapes(), strict=True))[:8]:
            columns = store[image_id]
            prob, cls = columns["topk_prob"], columns["topk_class"]
            assert prob.shape == (3, h, w) and prob.dtype == np.float16
            assert cls.shape == (3, h, w) and cls.dtype == np.uint8
            assert np.all(np.diff(prob.astype(np.float32), axis=0) <= 0)
            np.testing.assert_array_equal(prob[0], columns["conf"])
            np.testing.assert_array_equal(cls[0], columns["label"])
            assert np.all(cls[0] != cls[1]) and np.all(cls[1] != cls[2])
            assert float(prob.astype(np.float32).sum(0).max()) <= 1.0 + 2e-3


@pytest.mark.slow
def test_killed_predict_resumes_to_the_same_store(pretrained_run, tmp_path, capsys):
    """SIGKILL once the second part is on disk (the test hook LABELPIPE_TEST_KILL_AFTER_PART): the rerun
    resumes after those 8 images, not from 0, and merges a store identical to an uninterrupted run's."""
    reference = copy_run(pretrained_run, tmp_path / "reference")
    killed = copy_run(pretrained_run, tmp_path / "killed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPIPE_TEST_KILL")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), LABELPIPE_TEST_KILL_AFTER_PART="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelpipe", *predict_args(killed, *SMALL_PARTS)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    labelpipe(predict_args(reference, *SMALL_PARTS))  # the uninterrupted reference, while the subprocess runs
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    manifest = json.loads((killed / "predict" / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert not (killed / "predict" / "predictions.h5").exists()
    parts = killed / "predict" / "parts"
    assert len(list(parts.glob("part-*.h5"))) == 2

    capsys.readouterr()
    labelpipe(predict_args(killed, *SMALL_PARTS))
    assert "resuming predict: 8 images already in" in capsys.readouterr().out
    manifest = json.loads((killed / "predict" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2

    with (
        PredictionStore(reference / "predict" / "predictions.h5") as a,
        PredictionStore(killed / "predict" / "predictions.h5") as b,
    ):
        assert a.ids == b.ids and a.shapes() == b.shapes()
        assert a.attrs == b.attrs
        for image_id in a.ids:
            x, y = a[image_id], b[image_id]
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name], err_msg=f"{image_id} {name}")
