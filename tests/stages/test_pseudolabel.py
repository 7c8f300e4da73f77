"""pseudolabel: for each method, the stage (streaming over the store) gives the labels of the in-memory
generators on the concatenated store; report, plots, PNG export, seeds; one-line errors for bad stores."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.pseudo import (
    cbst_pseudo_labels,
    cbst_thresholds,
    dars_pseudo_labels,
    dars_thresholds,
    entropy_pseudo_labels,
    entropy_threshold,
    threshold_pseudo_labels,
    variance_pseudo_labels,
)
from labelpipe.pseudo.quality import error_auroc
from labelpipe.pseudo.registry import generator_names, get_generator
from labelpipe.store.prediction_store import PartWriter, PredictionStore, merge_parts
from tests.conftest import REPO, TINY_RECIPE

METHODS = generator_names()  # the registered generators (the built-ins, at collection)
ALPHA, ALPHA_T = 0.2, 0.2
PLOTS = ("class_distribution.png", "histograms.png", "samples.png", "reliability.png")


def labelpipe(args: list[str]) -> int:
    """The console entry point (``labelpipe.entry``: the lean path for --predictions, typer otherwise)."""
    from labelpipe.entry import main

    try:
        main(args)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 0


def pseudolabel(run: Path, method: str, *extra: str, tau: float = 0.9, seed: int = 0) -> Path:
    """Every option the test relies on is explicit: the run's config.yaml keeps the previous call's values."""
    code = labelpipe(
        [
            "pseudolabel",
            "--config",
            str(TINY_RECIPE),
            "--run",
            str(run),
            "--device",
            "cpu",
            "--method",
            method,
            "--alpha",
            str(ALPHA),
            "--tau",
            str(tau),
            "--seed",
            str(seed),
            "--set",
            f"pseudolabel.alpha_t={ALPHA_T}",
            "--export",
            "none",
            *extra,
        ]
    )
    assert code == 0
    return run / "pseudolabel" / method


@pytest.fixture()
def no_png_rendering(monkeypatch):
    """Plots are drawn by matplotlib in seconds a run: here they only touch their files (the stage still
    computes what they show); ``test_plots_are_rendered`` draws them."""
    from labelpipe import plots
    from labelpipe.pseudo import report

    def touch(*args, **kwargs) -> Path:
        path = next(a for a in (*args, *kwargs.values()) if isinstance(a, Path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    for name in ("class_distributions", "image_grid", "reliability"):
        monkeypatch.setattr(plots, name, touch)
    monkeypatch.setattr(report, "plot_histograms", touch)


def open_data(run: Path):
    from labelpipe.config import resolve_config
    from labelpipe.data import open_source

    data = resolve_config(run, TINY_RECIPE).data
    source = open_source(data.root, data.kind, data.digitscapes.model_dump(), default_root=data.resolved_root())
    return source, source.protocol(data.protocol)


def labeled_prior(run: Path) -> np.ndarray:
    """The class prior from the labeled masks, computed here independently of the stage."""
    source, roles = open_data(run)
    counts = np.zeros(source.num_classes, np.int64)
    for sample in source.split(roles["labeled"]):
        mask = source.read_mask(sample.mask)
        counts += np.bincount(mask[mask != 255], minlength=source.num_classes)
    return counts / counts.sum()


def concatenated(store_path: Path, columns: tuple[str, ...]) -> tuple[list[str], dict[str, np.ndarray]]:
    with PredictionStore(store_path) as store:
        images = [store.read(i, columns) for i in store.ids]
        return store.ids, {c: np.concatenate([a[c].ravel() for a in images]) for c in columns}


def in_memory(method: str, pred: dict[str, np.ndarray], prior: np.ndarray, C: int, tau: float, seed: int):
    """(labels, weights or None, thresholds or None) of the in-memory generator of ``method``."""
    label, conf = pred["label"], pred["conf"]
    if method == "threshold":
        return threshold_pseudo_labels(label, conf, tau), None, None
    if method == "cbst":
        t = cbst_thresholds(label, conf, ALPHA, C)
        return cbst_pseudo_labels(label, conf, t), None, t
    if method == "dars":
        t, s = dars_thresholds(label, conf, prior, ALPHA)
        return dars_pseudo_labels(label, conf, t, s, np.random.default_rng(seed)), None, t
    if method == "entropy":
        return (
            entropy_pseudo_labels(label, pred["entropy"], entropy_threshold(pred["entropy"], ALPHA_T))[0],
            None,
            None,
        )
    labels, weights = variance_pseudo_labels(label, pred["variance"])
    return labels, weights, None


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def write_store(run: Path, arrays: dict[str, dict[str, np.ndarray]], attrs: dict) -> Path:
    out = run / "predict" / "predictions.h5"
    writer = PartWriter(run / "predict" / "parts", images_per_part=64)
    for image_id, columns in arrays.items():
        writer.add(image_id, columns)
    writer.close()
    merge_parts(sorted((run / "predict" / "parts").glob("part-*.h5")), out, list(arrays), attrs)
    shutil.rmtree(run / "predict" / "parts")
    return out


@pytest.fixture(scope="module")
def predicted(pretrained_run, tmp_path_factory) -> Path:
    """A copy of the pretrained run with its predictions.h5."""
    run = tmp_path_factory.mktemp("pseudolabel") / "run"
    shutil.copytree(pretrained_run, run)
    assert labelpipe(["predict", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]) == 0
    return run


@pytest.fixture(scope="module")
def synthetic(data_cache, tmp_path_factory) -> Path:
    """A run whose store is built from the ground truth of the unlabeled images: every class present, 25% of
    labels wrong, and confidences that tie at 1.0 (as float16 saturates), so per-class thresholds and DARS's
    random sampling all matter (the 6-step model of ``predicted`` predicts background nearly everywhere)."""
    run = tmp_path_factory.mktemp("pseudolabel-synthetic") / "run"
    source, roles = open_data(run)
    C = source.num_classes
    rng = np.random.default_rng(0)
    arrays = {}
    for sample in source.split(roles["unlabeled"]):
        gt = source.read_mask(sample.mask)
        label = np.where((gt == 255) | (rng.random(gt.shape) < 0.25), rng.integers(0, C, gt.shape), gt)
        arrays[sample.id] = {
            "label": label.astype(np.uint8),
            "conf": np.clip(rng.beta(4, 1, gt.shape) * 1.15, 1 / C, 1).astype(np.float16),
            "entropy": (rng.random(gt.shape) * np.log(C)).astype(np.float16),
            "variance": rng.exponential(0.2, gt.shape).astype(np.float16),
        }
    write_store(
        run,
        arrays,
        {
            "classes": source.classes,
            "num_classes": C,
            "split": roles["unlabeled"],
            "columns": ["label", "conf", "entropy", "variance"],
            "temperature": 1.0,
        },
    )
    return run


def check_stage_equals_in_memory(run: Path, method: str, tau: float) -> dict:
    out = pseudolabel(run, method, tau=tau)
    source, _ = open_data(run)
    C = source.num_classes
    ids, pred = concatenated(run / "predict" / "predictions.h5", ("label", "conf", "entropy", "variance"))
    prior = labeled_prior(run)
    expected, expected_weights, thresholds = in_memory(method, pred, prior, C, tau, seed=0)

    with PredictionStore(out / "labels.h5", C) as labels_store:
        assert labels_store.ids == ids
        got = np.concatenate([labels_store[i]["label"].ravel() for i in ids])
        assert got.dtype == np.uint8 and np.all((got == 255) | (got < C))
        np.testing.assert_array_equal(got, expected, err_msg=f"{method}: stage != in-memory")
        if expected_weights is not None:
            weights = np.concatenate([labels_store[i]["weight"].ravel() for i in ids])
            np.testing.assert_array_equal(weights, expected_weights)
        else:
            assert "weight" not in labels_store[ids[0]]

    report = strict_json(out / "report.json")
    assert report["images"] == len(ids) and report["pixels"] == got.size
    assert report["kept_fraction"] == pytest.approx(np.mean(got != 255))
    if thresholds is not None:
        assert report["params"]["thresholds"] == [float(t) if math.isfinite(t) else None for t in thresholds]
    kept = np.bincount(got[got != 255], minlength=C)[:C]
    dist = kept / max(kept.sum(), 1)
    present = prior > 0
    kl = np.sum(prior[present] * (np.log(prior[present]) - np.log(dist[present] + 1e-8)))
    assert report["kl_prior_pseudo"] == pytest.approx(kl)
    for c, name in enumerate(source.classes):
        assert report["per_class"][name]["kept"] == kept[c]
        assert report["per_class"][name]["prior"] == pytest.approx(prior[c])
        assert "coverage" in report["per_class"][name] and "precision" in report["per_class"][name]

    gt = np.concatenate([source.read_mask(s.mask).ravel() for s in source.split(open_data(run)[1]["unlabeled"])])
    valid = gt != 255
    ious = []
    for c in range(C):
        tp = np.sum((got == c) & (gt == c))
        union = np.sum((got == c) & valid) + np.sum(gt == c) - tp
        if union:
            ious.append(tp / union)
    assert report["has_ground_truth"] is True
    assert report["pseudo_miou"] == pytest.approx(np.mean(ious))
    # How well conf and exp(-variance) (as float16, the report's resolution) rank the predictions' errors.
    wrong = pred["label"] != gt
    uncertain = {
        "conf": 1.0 - pred["conf"].astype(np.float64),
        "variance": -np.exp(-pred["variance"].astype(np.float32)).astype(np.float16).astype(np.float64),
    }
    for column, u in uncertain.items():
        assert report[f"error_auroc_{column}"] == pytest.approx(error_auroc(u[valid], wrong[valid]))
        for c, name in enumerate(source.classes):
            mine = valid & (pred["label"] == c)
            expected_c, got_c = error_auroc(u[mine], wrong[mine]), report["per_class"][name][f"error_auroc_{column}"]
            assert (got_c is None and math.isnan(expected_c)) or got_c == pytest.approx(expected_c), (column, name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and set(manifest["outputs"]) == {"labels.h5", "report.json"}
    return report


@pytest.mark.parametrize("method", METHODS)
def test_stage_labels_equal_the_in_memory_generator_on_the_predicted_store(predicted, method, no_png_rendering):
    _, pred = concatenated(predicted / "predict" / "predictions.h5", ("conf",))
    tau = float(np.median(pred["conf"].astype(np.float32)))  # the 6-step model is never 0.9 confident
    report = check_stage_equals_in_memory(predicted, method, tau)
    assert 0 < report["kept_fraction"] <= 1
    for name in PLOTS:
        assert (predicted / "pseudolabel" / method / "plots" / name).is_file(), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_stage_labels_equal_the_in_memory_generator_on_many_classes(synthetic, method, no_png_rendering):
    report = check_stage_equals_in_memory(synthetic, method, tau=0.9)
    if method in ("cbst", "dars"):
        kept = [v["kept"] for v in report["per_class"].values()]
        assert sum(k > 0 for k in kept) >= 8, "every class present should keep pixels"
    if method == "dars":
        sampling = report["params"]["sampling_ratio"]
        assert any(0 < s < 1 for s in sampling), "the ties at 1.0 should make DARS sample"


@pytest.mark.slow
def test_plots_are_rendered(predicted):
    out = pseudolabel(predicted, "dars", "--force")
    for name in PLOTS:
        with Image.open(out / "plots" / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100, name


@pytest.mark.slow
def test_dars_is_reproducible_by_seed(synthetic, no_png_rendering):
    def dars_labels(seed: int) -> np.ndarray:
        out = pseudolabel(synthetic, "dars", "--force", seed=seed)
        with PredictionStore(out / "labels.h5") as store:
            return np.concatenate([store[i]["label"].ravel() for i in store.ids])

    first, again, other = dars_labels(0), dars_labels(0), dars_labels(1)
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)
    assert abs(int(np.sum(first != 255)) - int(np.sum(other != 255))) < 0.05 * np.sum(first != 255)


@pytest.mark.slow
def test_png_export_writes_palette_images_and_a_list(synthetic, no_png_rendering):
    out = pseudolabel(synthetic, "cbst", "--export", "png")
    source, roles = open_data(synthetic)
    lines = (out / "export" / "list.txt").read_text().splitlines()
    with PredictionStore(out / "labels.h5") as store:
        assert [line.split("\t")[0] for line in lines] == store.ids
        for line in lines[:5]:
            image_id, name = line.split("\t")
            with Image.open(out / "export" / name) as im:
                assert im.mode == "P"
                assert im.getpalette()[: 3 * source.num_classes] == [v for rgb in source.palette for v in rgb]
                np.testing.assert_array_equal(np.asarray(im), store[image_id]["label"])
    assert "export/list.txt" in json.loads((out / "manifest.json").read_text())["outputs"]
    out = pseudolabel(synthetic, "cbst", "--export", "none")
    assert not (out / "export").exists(), "PNGs of an earlier run must not outlive it"


def run_expecting_error(run: Path, method: str, capsys) -> str:
    capsys.readouterr()
    code = labelpipe(
        [
            "pseudolabel",
            "--config",
            str(TINY_RECIPE),
            "--run",
            str(run),
            "--device",
            "cpu",
            "--method",
            method,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (run / "pseudolabel" / method / "manifest.json").exists()
    return err


def fake_store(run: Path, num_classes: int, columns: tuple[str, ...]) -> None:
    source, roles = open_data(run)
    shape = (32, 32)
    arrays = {
        s.id: {
            "label": np.zeros(shape, np.uint8),
            "conf": np.ones(shape, np.float16),
            "entropy": np.zeros(shape, np.float16),
            "variance": np.zeros(shape, np.float16),
        }
        for s in source.split(roles["unlabeled"])[:3]
    }
    arrays = {i: {c: a[c] for c in columns} for i, a in arrays.items()}
    write_store(
        run,
        arrays,
        {
            "classes": [f"c{c}" for c in range(num_classes)],
            "num_classes": num_classes,
            "columns": list(columns),
        },
    )


def test_store_of_another_class_count_is_refused(data_cache, tmp_path, capsys):
    fake_store(tmp_path / "run", 5, ("label", "conf", "entropy", "variance"))
    assert "store has 5 classes but the data set has 11" in run_expecting_error(tmp_path / "run", "dars", capsys)


def test_store_missing_a_column_is_refused(data_cache, tmp_path, capsys):
    fake_store(tmp_path / "run", 11, ("label", "conf"))
    err = run_expecting_error(tmp_path / "run", "entropy", capsys)
    assert "lacks column(s) entropy" in err and "rerun predict" in err


def test_pseudolabel_before_predict_says_to_predict(data_cache, tmp_path, capsys):
    err = run_expecting_error(tmp_path / "run", "threshold", capsys)
    assert "prediction store not found; run `labelpipe predict` first" in err


# ------------------------------------------------------------------------ bring your own predictions
BYO_CLASSES = 6
BYO_SHAPE = (20, 50)  # 1,000 pixels an image


@pytest.fixture(scope="module")
def byo_store(tmp_path_factory) -> Path:
    """A store from the public writer: 7 images, skewed classes, confidences tied at 1.0 (DARS samples)."""
    from labelpipe.store import PredictionWriter

    path = tmp_path_factory.mktemp("byo") / "predictions.h5"
    rng = np.random.default_rng(3)
    with PredictionWriter(path, [f"k{c}" for c in range(BYO_CLASSES)]) as writer:
        for i in range(7):
            label = rng.choice(BYO_CLASSES, size=BYO_SHAPE, p=[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]).astype(np.uint8)
            conf = np.clip(1.0 - rng.exponential(0.05, BYO_SHAPE), 1 / BYO_CLASSES, 1).astype(np.float16)
            writer.add(
                f"city{i % 2}/img{i}",
                label=label,
                conf=conf,
                entropy=(rng.random(BYO_SHAPE) * np.log(BYO_CLASSES)).astype(np.float16),
                variance=rng.exponential(0.2, BYO_SHAPE).astype(np.float16),
            )
    return path


BYO_PRIOR = [0.3, 0.3, 0.2, 0.1, 0.05, 0.05]


def byo(store: Path, out: Path, method: str, *extra: str) -> Path:
    prior = out.parent / "prior.json"
    prior.parent.mkdir(parents=True, exist_ok=True)
    prior.write_text(json.dumps(BYO_PRIOR))
    args = ["pseudolabel", "--predictions", str(store), "--out", str(out), "--prior", str(prior)]
    code = labelpipe([*args, "--method", method, "--alpha", "0.4", "--seed", "5", *extra])
    assert code == 0
    return out


def read_labels(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    with PredictionStore(path) as store:
        got = [store[i] for i in store.ids]
        weights = np.concatenate([g["weight"].ravel() for g in got]) if "weight" in got[0] else None
        return store.ids, np.concatenate([g["label"].ravel() for g in got]), weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_byo_labels_do_not_depend_on_the_chunk_size(byo_store, tmp_path, method):
    pixels = BYO_SHAPE[0] * BYO_SHAPE[1]
    # one image a chunk; the default (every image in one chunk); 77 pixels: one-row bands, 1 image in 20 chunks
    budgets = {"one-image": pixels, "default": None, "tiny": 77}
    results = {}
    for name, budget in budgets.items():
        extra = ["--chunk-pixels", str(budget)] if budget else []
        out = byo(byo_store, tmp_path / name / "out", method, *extra)
        results[name] = read_labels(out / "labels.h5"), json.loads((out / "report.json").read_text())
    (ids, labels, weights), report = results["default"]
    for name in ("one-image", "tiny"):
        (other_ids, other_labels, other_weights), other_report = results[name]
        assert other_ids == ids
        np.testing.assert_array_equal(other_labels, labels, err_msg=name)
        if weights is not None:
            np.testing.assert_array_equal(other_weights, weights)
        assert other_report["params"] == report["params"] and other_report["per_class"] == report["per_class"]
    _, pred = concatenated(byo_store, ("label", "conf", "entropy", "variance"))
    expected, expected_weights, thresholds = _in_memory_byo(method, pred)
    np.testing.assert_array_equal(labels, expected)
    if thresholds is not None:
        assert report["params"]["thresholds"] == [float(t) if math.isfinite(t) else None for t in thresholds]
    assert report["images"] == 7 and report["pixels"] == labels.size
    assert report["kept_fraction"] == pytest.approx(np.mean(labels != 255))


@pytest.mark.parametrize("method", METHODS)
def test_byo_stored_histograms_skip_a_read_and_give_the_same_labels(byo_store, tmp_path, method, monkeypatch):
    """The writer's stored pass-1 histograms: the same labels and report as a store without them, and the
    store's columns read once instead of twice."""
    import h5py

    bare = tmp_path / "bare.h5"
    shutil.copy(byo_store, bare)
    with h5py.File(bare, "r+") as fh:
        del fh["hist"]
    reads = []
    original = PredictionStore.iter_chunks

    def counted(self, columns=None, *args, **kwargs):
        reads.append(tuple(columns or ()))
        return original(self, columns, *args, **kwargs)

    monkeypatch.setattr(PredictionStore, "iter_chunks", counted)
    results = {}
    for name, store in (("stored", byo_store), ("bare", bare)):
        reads.clear()
        out = byo(store, tmp_path / name / "out", method)
        results[name] = read_labels(out / "labels.h5"), json.loads((out / "report.json").read_text()), list(reads)
    (ids, labels, weights), report, stored_reads = results["stored"]
    (bare_ids, bare_labels, bare_weights), bare_report, bare_reads = results["bare"]
    assert bare_ids == ids
    np.testing.assert_array_equal(bare_labels, labels)
    if weights is not None:
        np.testing.assert_array_equal(bare_weights, weights)
    for key in ("params", "per_class", "kept_fraction", "kl_prior_pseudo", "histograms"):
        assert bare_report.get(key) == report.get(key), key
    has_pass1 = get_generator(method).pass1({"alpha": 0.4, "alpha_t": 0.2, "tau": 0.9}) is not None
    assert len(stored_reads) == 1 and len(bare_reads) == (2 if has_pass1 else 1)


def _in_memory_byo(method: str, pred: dict[str, np.ndarray]):
    label, conf, prior = pred["label"], pred["conf"], np.array(BYO_PRIOR)
    if method == "dars":
        t, s = dars_thresholds(label, conf, prior, 0.4)
        return dars_pseudo_labels(label, conf, t, s, np.random.default_rng(5)), None, t
    if method == "cbst":
        t = cbst_thresholds(label, conf, 0.4, BYO_CLASSES)
        return cbst_pseudo_labels(label, conf, t), None, t
    if method == "threshold":
        return threshold_pseudo_labels(label, conf, 0.9), None, None
    if method == "entropy":
        gamma = entropy_threshold(pred["entropy"], 0.2)
        return entropy_pseudo_labels(label, pred["entropy"], gamma)[0], None, None
    labels, weights = variance_pseudo_labels(label, pred["variance"])
    return labels, weights, None


def test_byo_path_imports_neither_torch_nor_matplotlib_nor_the_cli_stack(byo_store, tmp_path):
    prior = tmp_path / "prior.npy"
    np.save(prior, np.array(BYO_PRIOR))
    args = ["pseudolabel", "--predictions", str(byo_store), "--out", str(tmp_path / "out"), "--prior", str(prior)]
    code = (
        "import sys\n"
        "from labelpipe.entry import main\n"
        f"main({args!r})\n"
        "modules = ('torch', 'torchvision', 'matplotlib', 'typer', 'pydantic', 'rich')\n"
        "loaded = [m for m in modules if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "labels.h5").is_file() and (tmp_path / "out" / "report.json").is_file()
    assert not (tmp_path / "out" / "plots").exists(), "plots are drawn on request (--plots) only"


def test_run_path_imports_no_torch(synthetic, data_cache):
    args = ["pseudolabel", "--config", str(TINY_RECIPE), "--run", str(synthetic), "--method", "cbst", "--force"]
    args += ["--export", "none", "--no-plots"]
    code = f"import sys\nfrom labelpipe.cli import main\nmain({args!r})\nassert 'torch' not in sys.modules\n"
    env = {**os.environ, "LABELPIPE_DATA": str(data_cache)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_byo_prior_from_masks_equals_the_same_prior_from_a_file(byo_store, tmp_path):
    masks = tmp_path / "masks" / "city0"
    masks.mkdir(parents=True)
    counts = (np.array(BYO_PRIOR) * 400).astype(int)  # 400 labeled pixels in these proportions, + ignored ones
    flat = np.concatenate([np.repeat(np.arange(BYO_CLASSES, dtype=np.uint8), counts), np.full(100, 255, np.uint8)])
    Image.fromarray(flat[:250].reshape(10, 25)).save(masks / "a.png")
    Image.fromarray(flat[250:].reshape(10, 25)).save(masks / "b.png")
    from_masks = tmp_path / "m" / "out"
    args = ["pseudolabel", "--predictions", str(byo_store), "--out", str(from_masks), "--method", "dars"]
    assert labelpipe([*args, "--alpha", "0.4", "--seed", "5", "--prior-from", str(tmp_path / "masks")]) == 0
    from_file = byo(byo_store, tmp_path / "f" / "out", "dars")
    assert read_labels(from_masks / "labels.h5")[1].tolist() == read_labels(from_file / "labels.h5")[1].tolist()
    report = json.loads((from_masks / "report.json").read_text())
    assert [v["prior"] for v in report["per_class"].values()] == pytest.approx(BYO_PRIOR)


def test_byo_is_up_to_date_and_draws_plots_on_request(byo_store, tmp_path, capsys):
    out = byo(byo_store, tmp_path / "out", "dars", "--plots")
    assert (out / "plots" / "class_distribution.png").is_file() and (out / "plots" / "histograms.png").is_file()
    capsys.readouterr()
    byo(byo_store, tmp_path / "out", "dars")
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "dars"], "needs the labeled class prior"),
        (["--method", "dars", "--prior", "{prior}"], "6 classes"),
        (["--method", "entropy", "--prior", "{prior}"], "lacks column(s) entropy"),
        (["--method", "cbst", "--out", ""], None),
    ],
)
def test_byo_errors_are_one_line(tmp_path, capsys, extra, message):
    from labelpipe.store import PredictionWriter

    store = tmp_path / "p.h5"
    with PredictionWriter(store, BYO_CLASSES) as writer:
        writer.add("a", label=np.zeros((4, 4), np.uint8), conf=np.ones((4, 4), np.float16))
    prior = tmp_path / "prior.json"
    prior.write_text("[0.5, 0.5]")
    extra = [e.replace("{prior}", str(prior)) for e in extra]
    args = ["pseudolabel", "--predictions", str(store), *extra]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    else:
        args = args[: args.index("--out")]  # no --out at all
        message = "needs --out"
    capsys.readouterr()
    assert labelpipe(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").is_file(), reason="torchrun is not installed")
def test_two_processes_give_the_labels_and_thresholds_of_one(byo_store, tmp_path):
    """torchrun, 2 gloo processes: pass 1's histograms are summed, each rank labels its shard (and skips the
    random draws of the shard before it): labels.h5 and the report equal one process's."""
    one = byo(byo_store, tmp_path / "one" / "out", "dars", "--chunk-pixels", "1500")
    prior = tmp_path / "one" / "prior.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["labelpipe", "--", "pseudolabel", "--predictions", str(byo_store), "--out", str(tmp_path / "two")]
    cmd += ["--prior", str(prior), "--method", "dars", "--alpha", "0.4", "--seed", "5", "--chunk-pixels", "700"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ids, labels, _ = read_labels(one / "labels.h5")
    two_ids, two_labels, _ = read_labels(tmp_path / "two" / "labels.h5")
    assert two_ids == ids
    np.testing.assert_array_equal(two_labels, labels)
    report, two_report = (json.loads((d / "report.json").read_text()) for d in (one, tmp_path / "two"))
    for key in ("params", "per_class", "pixels", "images", "kept_fraction", "kl_prior_pseudo", "histograms"):
        assert two_report[key] == report[key], key
    assert not list((tmp_path / "two").glob("labels.part-*"))
