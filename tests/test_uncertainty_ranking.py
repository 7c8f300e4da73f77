"""benchmarks/uncertainty_ranking.py: how each uncertainty ranks a store's errors, and what each way of using
the labels (rectified weights, thresholds, a variance cut) hands the round."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import TINY_RECIPE, load_benchmark, run_cli


@pytest.fixture(scope="module")
def ur():
    return load_benchmark("uncertainty_ranking")


def columns(**arrays):
    out = {k: np.asarray(v) for k, v in arrays.items()}
    out["entropy"] = out.get("entropy", 1.0 - out["conf"])
    return out


def test_selection_by_hand(ur):
    # 5 pixels, the last without ground truth. Labels: bg, digit 1, digit 1, digit 2, bg.
    c = columns(
        label=np.array([0, 1, 1, 2, 0], dtype=np.uint8),
        gt=np.array([0, 1, 0, 2, 255], dtype=np.uint8),
        conf=np.array([0.95, 0.9, 0.6, 0.85, 0.99], dtype=np.float16),
        variance=np.array([0.0, np.log(2), 0.0, np.log(4), 0.0], dtype=np.float32),
    )
    rows = ur.selection(c, [0.8])
    # every valid pixel: 3 of 4 right; the digits 2 of 3.
    assert rows["all pixels"] == pytest.approx({"share": 1.0, "precision": 0.75, "fg precision": 2 / 3})
    # weights exp(-variance) = 1, 1/2, 1, 1/4: the wrong pixel (weight 1) weighs more than two right ones.
    rect = rows["rectified exp(-variance)"]
    assert rect["share"] == pytest.approx(2.75 / 4)
    assert rect["precision"] == pytest.approx(1.75 / 2.75)
    assert rect["fg precision"] == pytest.approx(0.75 / 1.75)
    # tau 0.8 keeps the three confident pixels, all right; the variance cut at the same share keeps the three
    # least uncertain (variance 0, 0, log 2): one of them the wrong one.
    assert rows["tau 0.8"] == pytest.approx({"share": 0.75, "precision": 1.0, "fg precision": 1.0})
    assert rows["variance, tau 0.8's share"] == pytest.approx({"share": 0.75, "precision": 2 / 3, "fg precision": 0.5})


def test_ranking_reads_the_errors_against_each_score(ur):
    rng = np.random.default_rng(0)
    n = 4000
    gt = rng.integers(0, 3, size=n).astype(np.uint8)
    wrong = rng.random(n) < 0.3
    label = np.where(wrong, (gt + 1) % 3, gt).astype(np.uint8)
    conf = np.where(wrong, rng.uniform(0.3, 0.8, n), rng.uniform(0.5, 1.0, n)).astype(np.float16)
    variance = rng.random(n).astype(np.float16)  # unrelated to the errors
    out = ur.ranking(columns(label=label, gt=gt, conf=conf, variance=variance))
    assert out["error"] == pytest.approx(wrong.mean())
    assert out["1 - conf"] > 0.8 and out["fg 1 - conf"] > 0.8
    assert abs(out["variance"] - 0.5) < 0.05 and abs(out["fg variance"] - 0.5) < 0.06


def test_reads_a_run_store_against_its_masks(ur, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    assert run_cli(["predict", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]) == 0
    c = ur.read_store(run, ur.Path("predict/predictions.h5"))
    assert {"label", "conf", "entropy", "variance", "gt"} <= set(c) and c["gt"].shape == c["label"].shape
    assert c["label"].size > 0 and np.all((c["gt"] < 255) | (c["gt"] == 255))
    ur.main(["--run", str(run), "--taus", "0.5", "0.9"])
    out = capsys.readouterr().out
    all_pixels = next(line for line in out.splitlines() if line.startswith("| all pixels |"))
    error = ur.ranking(c)["error"]
    # every pixel kept: share 100 and precision = 1 - the error rate, as printed (one run: std 0).
    assert all_pixels.split("|")[2].strip() == "100.0 ± 0.0"
    assert all_pixels.split("|")[3].strip() == f"{100 * (1 - error):.1f} ± 0.0"
    assert "| tau 0.9 |" in out and "| variance, tau 0.5's share |" in out


def test_places_split_the_variance_by_stroke_edge_inside_and_errors(ur):
    # A 7 x 7 digit-1 square in a 9 x 9 image: with a 3 x 3 erosion its inside is the 5 x 5 centre.
    gt = np.zeros((9, 9), dtype=np.uint8)
    gt[1:8, 1:8] = 1
    interior = ur.stroke_interior(gt, 3)
    assert interior.sum() == 25 and interior[2:7, 2:7].all()
    label = gt.copy()
    label[0, 0] = 1  # a wrong digit label on the background
    label[4, 4] = 0  # a wrong background label inside the stroke
    variance = np.where(interior, 0.1, 0.5).astype(np.float32)
    variance[0, 0], variance[4, 4] = 2.0, 3.0
    c = {
        "label": label.ravel(),
        "gt": gt.ravel(),
        "variance": variance.ravel(),
        "interior": interior.ravel(),
    }
    got = ur.places(c)
    assert got["digit, right, stroke edge"] == pytest.approx((0.5, 24 / 81))
    assert got["digit, right, stroke inside"] == pytest.approx((0.1, 24 / 81))
    assert got["digit, wrong"] == pytest.approx((2.0, 1 / 81))
    assert got["background, wrong"] == pytest.approx((3.0, 1 / 81))
    assert got["background, right"] == pytest.approx((0.5, 31 / 81))
