"""DARS exact-count sampling (the authors' ``randperm`` per image and class; issue 14 item 4), against a
plain-loop reference, and its invariance to how the images are chunked."""

import json
import math

import numpy as np
import pytest

from labelpipe.config import PseudolabelConfig
from labelpipe.pseudo.dars import dars_exact_count_labels, dars_pseudo_labels, dars_thresholds, exact_keep_count
from labelpipe.pseudo.streaming import apply, fit_thresholds

IMAGES = [30, 1, 0, 45, 24]  # pixels per image (an empty one and a one-pixel one included)


def tiny_predictions(seed: int = 0, num_classes: int = 3):
    """Confidences tied at 1.0 for many pixels, so that every class has more candidates than its target."""
    rng = np.random.default_rng(seed)
    n = sum(IMAGES)
    label = rng.integers(0, num_classes, n).astype(np.uint8)
    conf = np.where(rng.random(n) < 0.7, 1.0, rng.uniform(0.4, 1.0, n)).astype(np.float16)
    return label, conf


def loop_exact_count(label, conf, thresholds, ratio, seed, image_pixels):
    """The rule written out: one float32 draw per pixel, in order; per image and class, the m candidates
    (conf >= t_c) sorted by (draw, pixel index), the first k = floor(s_c m + 0.5) kept."""
    u = np.random.default_rng(seed).random(label.size, dtype=np.float32)
    out = np.full(label.size, 255, dtype=np.uint8)
    start = 0
    for size in image_pixels:
        for c in range(len(thresholds)):
            cands = [p for p in range(start, start + size) if label[p] == c and float(conf[p]) >= thresholds[c]]
            k = math.floor(ratio[c] * len(cands) + 0.5)
            for p in sorted(cands, key=lambda p: (float(u[p]), p))[:k]:
                out[p] = c
        start += size
    return out


PRIOR = np.array([0.34, 0.33, 0.33])


def test_exact_count_matches_the_loop_and_keeps_exact_counts():
    label, conf = tiny_predictions()
    thresholds, ratio = dars_thresholds(label, conf, PRIOR, 0.4)
    assert np.all(ratio < 1)  # every class samples
    got = dars_exact_count_labels(label, conf, thresholds, ratio, np.random.default_rng(4), IMAGES)
    expected = loop_exact_count(label, conf, thresholds, ratio, 4, IMAGES)
    np.testing.assert_array_equal(got, expected)
    # exactly k per image and class, where Bernoulli keeps k only in expectation
    start = 0
    for size in IMAGES:
        image = slice(start, start + size)
        start += size
        for c in range(3):
            m = int(np.sum((label[image] == c) & (conf[image] >= thresholds[c])))
            assert int(np.sum(got[image] == c)) == exact_keep_count(ratio[c], m)


def test_exact_count_kept_pixels_are_candidates_and_depend_on_the_seed():
    label, conf = tiny_predictions(1)
    thresholds, ratio = dars_thresholds(label, conf, PRIOR, 0.4)
    a = dars_exact_count_labels(label, conf, thresholds, ratio, np.random.default_rng(0), IMAGES)
    b = dars_exact_count_labels(label, conf, thresholds, ratio, np.random.default_rng(0), IMAGES)
    c = dars_exact_count_labels(label, conf, thresholds, ratio, np.random.default_rng(1), IMAGES)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    kept = a != 255
    assert np.all(a[kept] == label[kept]) and np.all(conf[kept] >= thresholds[label[kept]])
    # the same number of kept pixels whatever the seed (per image and class), unlike Bernoulli sampling
    np.testing.assert_array_equal(np.bincount(a[kept], minlength=3), np.bincount(c[c != 255], minlength=3))


def test_exact_count_keep_rule_by_hand():
    assert [exact_keep_count(2 / 3, m) for m in (0, 1, 2, 3, 4)] == [0, 1, 1, 2, 3]
    assert exact_keep_count(1.0, 5) == 5 and exact_keep_count(0.0, 5) == 0


def test_exact_count_checks_the_image_sizes():
    label, conf = tiny_predictions()
    thresholds, ratio = dars_thresholds(label, conf, PRIOR, 0.4)
    with pytest.raises(ValueError, match="image_pixels"):
        dars_exact_count_labels(label, conf, thresholds, ratio, np.random.default_rng(0), [10, 10])


def chunked(label, conf, groups):
    """Chunks of whole images: ``groups`` lists how many images each chunk holds."""
    chunks, start, image = [], 0, 0
    for count in groups:
        sizes = IMAGES[image : image + count]
        end = start + sum(sizes)
        chunks.append(({"label": label[start:end], "conf": conf[start:end]}, sizes))
        start, image = end, image + count
    return chunks


def test_streaming_hands_whole_images_and_any_grouping_gives_the_same_labels():
    label, conf = tiny_predictions(2)
    settings = {"alpha": 0.4, "dars_sampling": "exact_count"}
    params = fit_thresholds("dars", [{"label": label, "conf": conf}], 3, PRIOR, settings)
    assert params["sampling"] == "exact_count"
    expected = loop_exact_count(label, conf, params["thresholds"], params["sampling_ratio"], 9, IMAGES)
    for groups in ([5], [1, 1, 1, 1, 1], [2, 3], [4, 1]):
        rng = np.random.default_rng(9)
        got = np.concatenate([apply("dars", params, c, rng, sizes)[0] for c, sizes in chunked(label, conf, groups)])
        np.testing.assert_array_equal(got, expected, err_msg=str(groups))
    # without the setting: the paper's Bernoulli sampling, as before
    bernoulli = fit_thresholds("dars", [{"label": label, "conf": conf}], 3, PRIOR, {"alpha": 0.4})
    assert bernoulli["sampling"] == "bernoulli"
    got = apply("dars", bernoulli, {"label": label, "conf": conf}, np.random.default_rng(9))[0]
    want = dars_pseudo_labels(
        label, conf, bernoulli["thresholds"], bernoulli["sampling_ratio"], np.random.default_rng(9)
    )
    np.testing.assert_array_equal(got, want)


def test_setting_default_stays_out_of_the_fingerprint():
    assert "dars_sampling" not in PseudolabelConfig().fingerprint_fields()
    assert PseudolabelConfig(dars_sampling="exact_count").fingerprint_fields()["dars_sampling"] == "exact_count"


def test_stage_never_splits_an_image_so_labels_do_not_depend_on_the_chunk_size(tmp_path):
    """The pseudolabel stage (bring-your-own store): a chunk budget of a few pixels would cut every image
    into bands; for exact counts the stage raises it to the largest image, and the labels stay the same."""
    from typer.testing import CliRunner

    from labelpipe.cli import app
    from labelpipe.store import PredictionStore, PredictionWriter

    shape = (6, 7)
    store = tmp_path / "predictions.h5"
    rng = np.random.default_rng(3)
    with PredictionWriter(store, ["a", "b", "c"]) as writer:
        for i in range(4):
            writer.add(
                f"img{i}",
                label=rng.integers(0, 3, shape).astype(np.uint8),
                conf=np.where(rng.random(shape) < 0.7, 1.0, 0.6).astype(np.float16),
            )
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps(PRIOR.tolist()))
    outs = {}
    for name, budget in {"tiny": "5", "default": None}.items():
        out = tmp_path / name
        args = ["pseudolabel", "--predictions", str(store), "--out", str(out), "--prior", str(prior)]
        args += ["--method", "dars", "--alpha", "0.4", "--seed", "5", "--set", "pseudolabel.dars_sampling=exact_count"]
        args += ["--set", "pseudolabel.plots=false"]
        if budget:
            args += ["--chunk-pixels", budget]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        with PredictionStore(out / "labels.h5") as labels:
            outs[name] = np.concatenate([labels[i]["label"].ravel() for i in labels.ids])
        outs[name + "_report"] = json.loads((out / "report.json").read_text())
    np.testing.assert_array_equal(outs["tiny"], outs["default"])
    params = outs["default_report"]["params"]
    with PredictionStore(store) as pred:
        label = np.concatenate([pred[i]["label"].ravel() for i in pred.ids])
        conf = np.concatenate([pred[i]["conf"].ravel() for i in pred.ids])
    thresholds, ratio = dars_thresholds(label, conf, PRIOR, 0.4)
    assert params["sampling"] == "exact_count"
    expected = loop_exact_count(label, conf, thresholds, ratio, 5, [shape[0] * shape[1]] * 4)
    np.testing.assert_array_equal(outs["default"], expected)
