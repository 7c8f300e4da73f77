import math

import numpy as np
import pytest

from labelpipe.pseudo.quality import PseudoQualityAccumulator, error_auroc, pseudo_label_quality, uncertainty_gap

from .synthetic import random_predictions

GT = np.array([0, 0, 1, 1, 2, 255], dtype=np.uint8)
PSEUDO = np.array([0, 255, 1, 0, 255, 2], dtype=np.uint8)
PRIOR = np.array([0.25, 0.25, 0.5])


def test_hand_computed_quality():
    # confusion rows gt 0, 1, 2; columns pseudo 0, 1, 2, not kept. The gt-255 pixel is ignored.
    quality = pseudo_label_quality(PSEUDO, GT, PRIOR, 3)
    np.testing.assert_array_equal(quality["confusion"], [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(quality["precision"], [0.5, 1.0, np.nan])
    np.testing.assert_allclose(quality["coverage"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(quality["recall"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(quality["iou"], [1 / 3, 1 / 2, 0.0])  # a missed pixel is a false negative
    assert quality["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    np.testing.assert_allclose(quality["iou_kept"], [1 / 2, 1 / 2, np.nan])
    assert quality["miou_kept"] == pytest.approx(0.5)
    assert quality["kept_fraction"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(quality["pseudo_distribution"], [0.5, 0.25, 0.25])
    # KL(r || r_pseudo) = .25 ln(.25/.5) + .25 ln(1) + .5 ln(.5/.25) = 0.25 ln 2
    assert quality["kl_prior_pseudo"] == pytest.approx(0.25 * math.log(2), abs=1e-6)
    assert math.isnan(quality["uncertainty_gap"])


def test_kl_is_zero_when_pseudo_distribution_matches_prior_and_finite_when_a_class_is_missing():
    quality = pseudo_label_quality(PSEUDO, GT, np.array([0.5, 0.25, 0.25]), 3)
    assert quality["kl_prior_pseudo"] == pytest.approx(0.0, abs=1e-6)
    none_kept = pseudo_label_quality(np.full(6, 255, np.uint8), GT, PRIOR, 3)
    assert math.isfinite(none_kept["kl_prior_pseudo"]) and none_kept["kl_prior_pseudo"] > 10


def test_uncertainty_gap_by_hand():
    certainty = np.array([0.9, 0.3, 0.8, 0.5, 0.7, 0.1])
    pred = np.array([0, 1, 1, 0, 2, 2], dtype=np.uint8)
    # right: pixels 0, 2, 4 (mean 0.8); wrong: 1, 3 (mean 0.4); pixel 5 has no ground truth.
    quality = pseudo_label_quality(PSEUDO, GT, PRIOR, 3, certainty=certainty, pred=pred)
    assert quality["uncertainty_gap"] == pytest.approx(0.4)
    correct = np.array([True, False, True, False, True])
    assert uncertainty_gap(certainty[:5], correct) == pytest.approx(0.4)
    assert math.isnan(uncertainty_gap(certainty[:2], np.array([True, True])))


def test_gap_defaults_to_the_kept_pseudo_labels():
    certainty = np.array([0.9, 0.3, 0.8, 0.5, 0.7, 0.1])
    # kept with gt: pixel 0 right (0.9), 2 right (0.8), 3 wrong (0.5)
    quality = pseudo_label_quality(PSEUDO, GT, PRIOR, 3, certainty=certainty)
    assert quality["uncertainty_gap"] == pytest.approx(0.85 - 0.5)


def test_error_auroc_by_hand_and_against_every_pair():
    # wrong pixels at 0.9 and 0.5; correct at 0.1, 0.5, 0.7: pairs (wrong > correct) 3 + 1, one tie (0.5, 0.5)
    # counted half, 6 pairs in all -> (4 + 0.5) / 6.
    u = np.array([0.9, 0.1, 0.5, 0.5, 0.7])
    wrong = np.array([True, False, True, False, False])
    assert error_auroc(u, wrong) == pytest.approx(4.5 / 6)
    assert error_auroc(-u, wrong) == pytest.approx(1.5 / 6)  # the reversed ranking: 1 - AUROC
    assert math.isnan(error_auroc(u, np.zeros(5, dtype=bool)))
    # float16 values with many ties, against the definition over every (wrong, correct) pair.
    rng = np.random.default_rng(0)
    u = rng.integers(0, 20, size=300).astype(np.float16) / 7
    wrong = rng.random(300) < u / 4
    w, c = u[wrong].astype(float), u[~wrong].astype(float)
    pairs = (w[:, None] > c[None, :]).mean() + 0.5 * (w[:, None] == c[None, :]).mean()
    assert error_auroc(u, wrong) == pytest.approx(pairs)
    assert error_auroc(u, wrong) > 0.6  # the errors were drawn more often at high u


def test_accumulator_ranks_the_errors_of_the_certainty_it_is_fed_overall_and_per_predicted_class():
    rng = np.random.default_rng(1)
    n, classes = 5000, 3
    gt = rng.integers(0, classes, size=n).astype(np.uint8)
    wrong = rng.random(n) < 0.25
    pred = np.where(wrong, (gt + 1) % classes, gt).astype(np.uint8)
    # class 0's certainty tells its errors, the others' is noise; float16 as the stores hold it.
    informative = np.where(wrong, rng.uniform(0.2, 0.8, n), rng.uniform(0.5, 1.0, n))
    certainty = np.where(pred == 0, informative, rng.uniform(0.0, 1.0, n)).astype(np.float16)
    gt[::13] = 255  # no ground truth: not judged
    judged = gt != 255
    prior = np.full(classes, 1 / classes)
    halves = [PseudoQualityAccumulator(classes, prior) for _ in range(2)]
    for part, accumulator in zip((slice(0, 2000), slice(2000, n)), halves, strict=True):
        accumulator.update(pred[part], gt[part], certainty=certainty[part], pred=pred[part])
    halves[0].merge(halves[1])
    q = halves[0].result()
    u = 1.0 - certainty.astype(np.float64)
    assert q["error_auroc"] == pytest.approx(error_auroc(u[judged], (pred != gt)[judged]))
    for c in range(classes):
        mine = judged & (pred == c)
        assert q["error_auroc_per_class"][c] == pytest.approx(error_auroc(u[mine], (pred != gt)[mine]))
    assert q["error_auroc_per_class"][0] > 0.8 and abs(q["error_auroc_per_class"][1] - 0.5) < 0.06
    # Without a certainty there is nothing to rank.
    plain = pseudo_label_quality(pred, gt, prior, classes)
    assert math.isnan(plain["error_auroc"]) and np.isnan(plain["error_auroc_per_class"]).all()


def test_streaming_accumulation_equals_one_shot():
    label, conf = random_predictions(2, 3000, 4)
    gt = np.where(np.random.default_rng(3).random(3000) < 0.8, label, np.uint8(1)).astype(np.uint8)
    gt[::17] = 255
    pseudo = np.where(conf > 0.9, label, 255).astype(np.uint8)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    whole = pseudo_label_quality(pseudo, gt, prior, 4, certainty=conf, pred=label)
    accumulator = PseudoQualityAccumulator(4, prior)
    for start in range(0, 3000, 700):
        piece = slice(start, start + 700)
        accumulator.update(pseudo[piece], gt[piece], certainty=conf[piece], pred=label[piece])
    streamed = accumulator.result()
    for key, value in whole.items():
        np.testing.assert_allclose(streamed[key], value, rtol=1e-12, err_msg=key)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="class ids >= 3"):
        pseudo_label_quality(np.array([3], np.uint8), np.array([0], np.uint8), PRIOR, 3)
    with pytest.raises(ValueError, match="same number of pixels"):
        pseudo_label_quality(PSEUDO[:2], GT, PRIOR, 3)
    with pytest.raises(ValueError, match="prior has 3 classes"):
        PseudoQualityAccumulator(4, PRIOR)
    with pytest.raises(ValueError, match="sum to 1"):
        PseudoQualityAccumulator(3, np.array([0.5, 0.5, 0.5]))
