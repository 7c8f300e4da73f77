import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import labelpipe.pseudo as pseudo
from labelpipe.pseudo.registry import generator_names
from labelpipe.pseudo.streaming import apply, fit_thresholds

from .synthetic import random_nonnegative_float16, random_predictions, random_prior

METHODS = generator_names()
SETTINGS = {"alpha": 0.4, "tau": 0.9, "alpha_t": 0.2, "percentile": 90.0}


def make_chunks(seed: int, sizes: list[int], num_classes: int) -> list[dict[str, np.ndarray]]:
    label, conf = random_predictions(seed, sum(sizes), num_classes)
    entropy = random_nonnegative_float16(seed + 1, sum(sizes))
    variance = random_nonnegative_float16(seed + 2, sum(sizes))
    chunks, start = [], 0
    for size in sizes:
        piece = slice(start, start + size)
        chunk = {
            "label": label[piece],
            "conf": conf[piece],
            "entropy": entropy[piece],
            "variance": variance[piece],
        }
        if size % 2 == 0 and size:  # some chunks arrive as 2-D maps
            chunk = {key: value.reshape(2, size // 2) for key, value in chunk.items()}
        chunks.append(chunk)
        start += size
    return chunks


def in_memory(method, chunks, prior, rng):
    label = np.concatenate([c["label"].ravel() for c in chunks])
    column = {key: np.concatenate([c[key].ravel() for c in chunks]) for key in ("conf", "entropy", "variance")}
    num_classes = prior.size
    if method == "threshold":
        return pseudo.threshold_pseudo_labels(label, column["conf"], SETTINGS["tau"]), None
    if method == "cbst":
        thresholds = pseudo.cbst_thresholds(label, column["conf"], SETTINGS["alpha"], num_classes)
        return pseudo.cbst_pseudo_labels(label, column["conf"], thresholds), None
    if method == "dars":
        thresholds, ratio = pseudo.dars_thresholds(label, column["conf"], prior, SETTINGS["alpha"])
        return pseudo.dars_pseudo_labels(label, column["conf"], thresholds, ratio, rng), None
    if method == "entropy":
        gamma = pseudo.entropy_threshold(column["entropy"], SETTINGS["alpha_t"])
        return pseudo.entropy_pseudo_labels(label, column["entropy"], gamma)[0], None
    return pseudo.variance_pseudo_labels(label, column["variance"], SETTINGS["percentile"])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    sizes=st.lists(st.integers(0, 600), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    num_classes=st.integers(1, 5),
)
def test_streaming_over_chunks_equals_in_memory_on_the_concatenation(seed, sizes, num_classes):
    chunks = make_chunks(seed, sizes, num_classes)
    prior = random_prior(seed, num_classes)
    for method in METHODS:
        params = fit_thresholds(method, iter(chunks), num_classes, prior=prior, **SETTINGS)
        rng = np.random.default_rng(seed)
        outputs = [apply(method, params, chunk, rng) for chunk in chunks]
        for (labels, _), chunk in zip(outputs, chunks, strict=True):
            assert labels.shape == chunk["label"].shape
        streamed = np.concatenate([labels.ravel() for labels, _ in outputs])
        expected, expected_weights = in_memory(method, chunks, prior, np.random.default_rng(seed))
        np.testing.assert_array_equal(streamed, expected, err_msg=method)
        if expected_weights is not None:
            weights = np.concatenate([w.ravel() for _, w in outputs])
            np.testing.assert_array_equal(weights, expected_weights)


def test_dars_params_report_counts():
    chunks = make_chunks(0, [400, 300], 3)
    params = fit_thresholds("dars", chunks, 3, prior=np.array([0.5, 0.3, 0.2]), alpha=0.5)
    assert params["n_pixels"] == 700
    np.testing.assert_array_equal(params["target_counts"], np.floor(0.5 * np.array([0.5, 0.3, 0.2]) * 700))
    assert np.all(params["candidate_counts"] >= np.minimum(params["target_counts"], params["class_counts"]))


def test_fit_reads_a_one_shot_iterator_once():
    chunks = make_chunks(1, [100, 100], 2)
    params = fit_thresholds("entropy", (chunk for chunk in chunks), 2, alpha_t=0.2)
    assert params["n_pixels"] == 200 and params["n_reliable"] <= 160


def test_the_builtin_generators_are_registered_and_read_store_columns():
    from labelpipe.store.prediction_store import DEFAULT_COLUMNS

    assert set(METHODS) == {"threshold", "cbst", "dars", "entropy", "variance"}
    for name in METHODS:
        generator = pseudo.get_generator(name)
        spec = generator.pass1({**SETTINGS, "variance_percentile": 90.0})
        read = set(generator.pass2_columns) | set(spec.columns() if spec else ())
        assert generator.pass2_columns[0] == "label" and read <= set(DEFAULT_COLUMNS), name
    assert [n for n in METHODS if pseudo.get_generator(n).weights] == ["variance"]
    assert [n for n in METHODS if pseudo.get_generator(n).random] == ["dars"]
    # variance reads its column in pass 1 only for a percentile cut; threshold never
    assert pseudo.get_generator("variance").pass1({"variance_percentile": None}) is None
    assert pseudo.get_generator("threshold").pass1(SETTINGS) is None


def test_invalid_usage_raises():
    chunks = make_chunks(0, [10], 2)
    with pytest.raises(ValueError, match="unknown pseudo-label method"):
        fit_thresholds("fixmatch", chunks, 2)
    with pytest.raises(ValueError, match="needs prior"):
        fit_thresholds("dars", chunks, 2, alpha=0.5)
    with pytest.raises(ValueError, match="needs alpha"):
        fit_thresholds("cbst", chunks, 2)
    with pytest.raises(ValueError, match="needs chunk key 'conf'"):
        fit_thresholds("cbst", [{"label": chunks[0]["label"]}], 2, alpha=0.5)
    params = fit_thresholds("dars", chunks, 2, prior=np.array([0.5, 0.5]), alpha=0.5)
    with pytest.raises(ValueError, match="needs rng"):
        apply("dars", params, chunks[0])
    with pytest.raises(ValueError, match="fitted for 'dars'"):
        apply("cbst", params, chunks[0])
