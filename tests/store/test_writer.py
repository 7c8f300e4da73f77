"""The public prediction-store writer: columns read back exactly; probabilities and logits are reduced with
``predict``'s formulas (checked against float64 numpy here), band by band with the same result; bad input
is refused with one-line errors and leaves no file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelpipe.errors import LabelpipeError
from labelpipe.store import PredictionStore, PredictionWriter
from labelpipe.store import writer as writer_module
from labelpipe.store.columns import pixel_columns

C = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def random_logits(seed: int, shape: tuple[int, int] = (12, 17)) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((C, *shape)) * 3).astype(np.float32)


def test_columns_read_back_exactly_with_store_attributes(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        f"city/{i}": {
            "label": rng.integers(0, C, (6 + i, 9)).astype(np.uint8),
            "conf": rng.random((6 + i, 9)).astype(np.float16),
            "entropy": (rng.random((6 + i, 9)) * 2).astype(np.float32),  # stored as float16
        }
        for i in range(3)
    }
    with PredictionWriter(tmp_path / "p.h5", [f"c{c}" for c in range(C)], attrs={"model": "mine"}) as writer:
        for image_id, columns in images.items():
            writer.add(image_id, **columns)
    with PredictionStore(tmp_path / "p.h5", C, require=("label", "conf", "entropy")) as store:
        assert store.ids == list(images)
        assert store.attrs["classes"] == [f"c{c}" for c in range(C)] and store.attrs["model"] == "mine"
        assert store.columns == ["label", "conf", "entropy"]
        assert store.shapes() == [(6, 9), (7, 9), (8, 9)]
        for image_id, columns in images.items():
            got = store[image_id]
            np.testing.assert_array_equal(got["label"], columns["label"])
            np.testing.assert_array_equal(got["conf"], columns["conf"])
            assert got["entropy"].dtype == np.float16
            np.testing.assert_array_equal(got["entropy"], columns["entropy"].astype(np.float16))


def test_probabilities_are_reduced_with_the_section_1_formulas(tmp_path):
    logits, logits_aux = random_logits(1), random_logits(2)
    p, p_aux = softmax(logits.astype(np.float64)), softmax(logits_aux.astype(np.float64))
    with PredictionWriter(tmp_path / "p.h5", C) as writer:
        writer.add_probabilities("a", p.astype(np.float32), p_aux.astype(np.float32))
    with PredictionStore(tmp_path / "p.h5") as store:
        got = store["a"]
        assert store.columns == ["label", "conf", "entropy", "variance"]
    np.testing.assert_array_equal(got["label"], p.argmax(0))
    np.testing.assert_allclose(got["conf"].astype(np.float64), p.max(0), rtol=1e-3)
    np.testing.assert_allclose(got["entropy"].astype(np.float64), -(p * np.log(p)).sum(0), rtol=2e-3, atol=1e-4)
    kl = (p * (np.log(p) - np.log(p_aux))).sum(0)
    np.testing.assert_allclose(got["variance"].astype(np.float64), kl, rtol=2e-3, atol=1e-3)


def test_logits_give_exactly_predicts_columns(tmp_path):
    logits, aux = random_logits(3), random_logits(4)
    expected = pixel_columns(torch.from_numpy(logits), torch.from_numpy(aux), 2.0)
    with PredictionWriter(tmp_path / "p.h5", C, temperature=2.0) as writer:
        writer.add_logits("x", logits, aux)
    with PredictionStore(tmp_path / "p.h5") as store:
        assert store.attrs["temperature"] == 2.0
        for name, tensor in expected.items():
            dtype = np.uint8 if name == "label" else np.float16
            np.testing.assert_array_equal(store["x"][name], tensor.numpy().astype(dtype), err_msg=name)


def test_probabilities_of_exactly_zero_give_finite_columns(tmp_path):
    probs = np.zeros((C, 2, 3), np.float32)
    probs[2] = 1.0  # one-hot: log 0 elsewhere
    probs[:, 1, 2] = [0.5, 0.5, 0.0, 0.0, 0.0]
    with PredictionWriter(tmp_path / "p.h5", C) as writer:
        writer.add_probabilities("a", probs)
    with PredictionStore(tmp_path / "p.h5") as store:
        got = store["a"]
    assert got["label"][0, 0] == 2 and got["conf"][0, 0] == 1.0 and got["entropy"][0, 0] == 0.0
    assert got["entropy"][1, 2] == np.float16(np.log(2))


def test_bands_of_rows_give_the_whole_maps_columns(tmp_path, monkeypatch):
    probs = softmax(random_logits(5, (23, 11)).astype(np.float64)).astype(np.float32)
    with PredictionWriter(tmp_path / "whole.h5", C) as writer:
        writer.add_probabilities("a", probs)
    monkeypatch.setattr(writer_module, "BAND_PIXELS", 3 * 11 + 5)  # bands of 3 rows, the last of 2
    with PredictionWriter(tmp_path / "bands.h5", C) as writer:
        writer.add_probabilities("a", torch.from_numpy(probs))
    with PredictionStore(tmp_path / "whole.h5") as whole, PredictionStore(tmp_path / "bands.h5") as bands:
        for name in ("label", "conf", "entropy"):
            np.testing.assert_array_equal(whole["a"][name], bands["a"][name])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.add("a", conf=np.ones((2, 2), np.float16)), "label column"),
        (lambda w: w.add("a", label=np.full((2, 2), C, np.uint8)), r"outside \[0, 5\)"),
        (lambda w: w.add("a", label=np.zeros((2, 2), np.uint8), conf=np.full((2, 2), 1.5)), r"conf must lie in"),
        (lambda w: w.add("a", label=np.zeros((2, 2), np.uint8), conf=np.ones((2, 3))), "shape"),
        (lambda w: w.add("a", label=np.zeros((2, 2), np.uint8), logits=np.ones((2, 2))), "unknown column"),
        (lambda w: w.add("a", label=np.zeros(4, np.uint8)), "2-D"),
        (lambda w: w.add_probabilities("a", np.ones((C + 1, 2, 2), np.float32)), r"\(C=5, H, W\)"),
        (lambda w: w.add_probabilities("a", -np.ones((C, 2, 2), np.float32)), "negative"),
        (lambda w: w.add_logits("a", np.full((C, 2, 2), np.nan, np.float32)), "NaN"),
    ],
)
def test_bad_input_is_refused_and_leaves_no_file(tmp_path, call, message):
    path = tmp_path / "p.h5"
    with pytest.raises(LabelpipeError, match=message), PredictionWriter(path, C) as writer:
        call(writer)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_every_image_brings_the_same_columns_and_a_new_id(tmp_path):
    with PredictionWriter(tmp_path / "p.h5", C) as writer:
        writer.add("a", label=np.zeros((2, 2), np.uint8), conf=np.ones((2, 2), np.float16))
        with pytest.raises(LabelpipeError, match="differ from the first image's"):
            writer.add("b", label=np.zeros((2, 2), np.uint8))
        with pytest.raises(LabelpipeError, match="added twice"):
            writer.add("a", label=np.zeros((2, 2), np.uint8), conf=np.ones((2, 2), np.float16))
    with PredictionStore(tmp_path / "p.h5") as store:
        assert store.ids == ["a"]
    with pytest.raises(LabelpipeError, match="no image was added"):
        PredictionWriter(tmp_path / "empty.h5", C).close()
    assert not (tmp_path / "empty.h5").exists()


def test_stored_histograms_equal_what_pass_1_counts_from_the_columns(tmp_path):
    from labelpipe.pseudo.histogram import NUM_BINS
    from labelpipe.pseudo.streaming import histogram_pass

    rng = np.random.default_rng(4)
    path = tmp_path / "p.h5"
    with PredictionWriter(path, C) as writer:
        for i, shape in enumerate([(9, 13), (1, 40), (20, 3)]):
            conf = rng.random(shape).astype(np.float16)
            conf[0, 0] = -0.0  # counted as +0.0, as pass 1 counts it
            writer.add(
                f"im{i}",
                label=rng.integers(0, C, shape),
                conf=conf,
                entropy=(rng.random(shape) * 2).astype(np.float16),
                variance=rng.exponential(0.3, shape).astype(np.float16),
            )
    with PredictionStore(path) as store:
        for column, method, settings in [
            ("conf", "dars", {"alpha": 0.5}),
            ("entropy", "entropy", {"alpha_t": 0.2}),
            ("variance", "variance", {"variance_percentile": 80.0}),
        ]:
            stored = store.stored_histogram(column, C, NUM_BINS)
            chunks = store.iter_chunks((column, "label"), max_pixels=50)
            computed = histogram_pass(method, chunks, C, settings)
            per_class = computed.counts.shape[0] == C
            np.testing.assert_array_equal(stored if per_class else stored.sum(0, keepdims=True), computed.counts)
        assert store.stored_histogram("conf", C + 1, NUM_BINS) is None  # another layout: not used


def test_histograms_can_be_left_out_and_a_stored_one_that_does_not_add_up_is_ignored(tmp_path):
    import h5py

    from labelpipe.pseudo.histogram import NUM_BINS

    label, conf = np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float16)
    with PredictionWriter(tmp_path / "none.h5", C, histograms=False) as writer:
        writer.add("a", label=label, conf=conf)
    with PredictionStore(tmp_path / "none.h5") as store:
        assert store.stored_histogram("conf", C, NUM_BINS) is None
    with PredictionWriter(tmp_path / "p.h5", C) as writer:
        writer.add("a", label=label, conf=conf)
    with PredictionStore(tmp_path / "p.h5") as store:
        assert store.stored_histogram("conf", C, NUM_BINS).sum() == 16
    with h5py.File(tmp_path / "p.h5", "r+") as fh:
        fh["hist/conf/count"][0] = 15  # no longer the store's 16 pixels
    with PredictionStore(tmp_path / "p.h5") as store:
        assert store.stored_histogram("conf", C, NUM_BINS) is None
