"""``labelpipe pseudolabel --method {threshold,cbst,dars,entropy,variance}``.

Streams over the prediction store in at most two passes (``labelpipe.pseudo.streaming``): pass 1
fits the thresholds from float16 histograms, pass 2 labels each image and accumulates the
report. Memory does not grow with the number of images. Output: ``labels.h5`` (uint8 label,
float16 weight for ``variance``), ``report.json``, plots, optional palette PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from labelpipe import plots
from labelpipe.config import RunConfig
from labelpipe.data import read_image
from labelpipe.errors import LabelpipeError
from labelpipe.metrics import CalibrationAccumulator
from labelpipe.pseudo import PASS1_KEYS, PASS2_KEYS, PseudoQualityAccumulator, apply, fit_thresholds
from labelpipe.runtime import Runtime
from labelpipe.stages.common import StageContext, class_prior, open_context
from labelpipe.store.atomic import atomic_path, atomic_write_json, sha256_file, sha256_json, temp_sibling
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import LIBVER, PredictionStore, _write_index, write_image

HIST_BINS = 64


def _store_hash(store_path: Path) -> str:
    manifest = StageDir(store_path.parent).manifest() or {}
    return manifest.get("outputs", {}).get(store_path.name) or sha256_file(store_path)


def _split_chunk(array: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    out, start = [], 0
    for h, w in shapes:
        out.append(array[start : start + h * w].reshape(h, w))
        start += h * w
    return out


def _jsonable(value: Any) -> Any:
    """numpy -> JSON types; NaN and +-inf (an empty class's threshold) -> null, since JSON has neither."""
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def generate(
    store: PredictionStore,
    method: str,
    num_classes: int,
    prior: np.ndarray,
    alpha: float,
    tau: float,
    alpha_t: float,
    percentile: float | None,
    seed: int,
):
    """Pass 1 (fit) then a generator of (ids, shapes, chunk, labels, weights) for pass 2."""
    params = fit_thresholds(
        method,
        store.iter_chunks(PASS1_KEYS[method] + ("label",) if PASS1_KEYS[method] else ("label",)),
        num_classes,
        prior=prior,
        alpha=alpha,
        tau=tau,
        alpha_t=alpha_t,
        percentile=percentile,
    )
    rng = np.random.default_rng(seed)
    wanted = tuple(
        dict.fromkeys(PASS2_KEYS[method] + tuple(c for c in ("conf", "entropy", "variance") if c in store.columns))
    )

    def labels():
        for chunk in store.iter_chunks(wanted):
            lab, weight = apply(method, params, chunk, rng)
            yield chunk, lab, weight

    return params, labels()


def run_pseudolabel(
    config: RunConfig,
    run_dir: Path,
    runtime: Runtime,
    force: bool = False,
    store_path: Path | None = None,
    out_dir: Path | None = None,
    alpha: float | None = None,
    quiet: bool = False,
) -> Path:
    ctx = open_context(config, run_dir, runtime)
    config = ctx.config  # with defaults that depend on the data resolved
    pcfg = config.pseudolabel
    method = pcfg.method
    alpha = pcfg.alpha if alpha is None else alpha
    store_path = store_path or run_dir / "predict" / "predictions.h5"
    stage = StageDir(out_dir or run_dir / "pseudolabel" / method)
    if not runtime.is_main:
        return stage.path / "labels.h5"
    prior_split = pcfg.prior_from or ctx.roles["labeled"]
    with PredictionStore(store_path, ctx.source.num_classes, require=PASS2_KEYS[method]) as store:
        inputs = {
            "method": method,
            "alpha": alpha,
            "tau": pcfg.tau,
            "alpha_t": pcfg.alpha_t,
            "variance_percentile": pcfg.variance_percentile,
            "seed": config.seed,
            "prior_from": prior_split,
            "prior_ids": ctx.split_ids_fingerprint(prior_split),
            "store": _store_hash(store_path),
            "export": pcfg.export,
        }
        fingerprint = sha256_json(inputs)
        if not force and stage.is_up_to_date(fingerprint):
            if not quiet:
                print(f"pseudolabel: up to date ({stage.path}); use --force to redo")
            return stage.path / "labels.h5"
        # Cheap and deterministic (seeded): redone whole, never resumed.
        stage.begin("pseudolabel", fingerprint, inputs)
        prior = class_prior(ctx, prior_split)
        report = _label_and_report(ctx, store, stage.path, method, prior, alpha, config.seed)
    atomic_write_json(stage.path / "report.json", report)
    outputs = ["labels.h5", "report.json"] + (["export/list.txt"] if pcfg.export == "png" else [])
    summary = {k: report[k] for k in ("kept_fraction", "kl_prior_pseudo", "pseudo_miou") if report.get(k) is not None}
    stage.finish(outputs, summary)
    if not quiet:
        print_report(report, ctx.source.classes)
    return stage.path / "labels.h5"


def _label_and_report(
    ctx: StageContext,
    store: PredictionStore,
    out: Path,
    method: str,
    prior: np.ndarray,
    alpha: float,
    seed: int,
) -> dict:
    pcfg = ctx.config.pseudolabel
    source, C = ctx.source, ctx.source.num_classes
    by_id = (
        {s.id: s for s in source.split(store.attrs.get("split", ctx.roles["unlabeled"]))}
        if (store.attrs.get("split") in source.splits)
        else {}
    )
    # Ground truth only where every image of the store has a mask (research splits such as DigitScapes').
    has_gt = bool(by_id) and all(i in by_id and by_id[i].mask is not None for i in store.ids)
    params, stream = generate(store, method, C, prior, alpha, pcfg.tau, pcfg.alpha_t, pcfg.variance_percentile, seed)
    quality = PseudoQualityAccumulator(C, prior)
    calib = CalibrationAccumulator()
    kept_counts = np.zeros(C, np.int64)
    pred_counts = np.zeros(C, np.int64)
    gt_counts = np.zeros(C, np.int64)
    n_pixels = 0
    hist_range = {"conf": (0.0, 1.0), "entropy": (0.0, float(np.log(C))), "variance": (0.0, 2.0)}
    hists = {k: np.zeros(HIST_BINS, np.int64) for k in hist_range if k in store.columns}
    gap_variance = PseudoQualityAccumulator(C, prior) if "variance" in store.columns else None
    rows: list[list[np.ndarray]] = []
    export_dir = out / "export"
    shutil.rmtree(export_dir, ignore_errors=True)  # PNGs of an earlier run are not this run's labels
    shutil.rmtree(out / "plots", ignore_errors=True)
    if pcfg.export == "png":
        export_dir.mkdir(parents=True)
    tmp = temp_sibling(out / "labels.h5")
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as fh:
            grp = fh.create_group("images")
            ids_written: list[str] = []
            shapes_written: list[tuple[int, int]] = []
            for chunk, labels, weights in stream:
                n_pixels += labels.size
                kept = labels != 255
                kept_counts += np.bincount(labels[kept], minlength=C)[:C]
                pred_counts += np.bincount(chunk["label"], minlength=C)[:C]
                for k in hists:
                    hists[k] += np.histogram(chunk[k].astype(np.float32), bins=HIST_BINS, range=hist_range[k])[0]
                per_label = _split_chunk(labels, chunk["shapes"])
                per_weight = _split_chunk(weights, chunk["shapes"]) if weights is not None else [None] * len(per_label)
                per_pred = _split_chunk(chunk["label"], chunk["shapes"])
                per_conf = _split_chunk(chunk["conf"], chunk["shapes"]) if "conf" in chunk else [None] * len(per_label)
                per_var = (
                    _split_chunk(chunk["variance"], chunk["shapes"]) if "variance" in chunk else [None] * len(per_label)
                )
                for image_id, lab, wt, pred, conf, var in zip(
                    chunk["ids"], per_label, per_weight, per_pred, per_conf, per_var, strict=True
                ):
                    columns = {"label": lab} if wt is None else {"label": lab, "weight": wt}
                    write_image(grp, image_id, columns)
                    ids_written.append(image_id)
                    shapes_written.append(lab.shape)
                    if pcfg.export == "png":
                        im = Image.fromarray(lab, mode="P")
                        im.putpalette([v for rgb in source.palette for v in rgb] + [255] * 3 * (256 - C))
                        im.save(export_dir / f"{image_id.replace('/', '__')}.png")
                    gt = None
                    if has_gt:
                        gt = source.read_mask(by_id[image_id].mask)
                        if gt.shape != lab.shape:
                            raise LabelpipeError(f"{by_id[image_id].mask}: mask size differs from the prediction's")
                        gt_counts += np.bincount(gt[gt != 255].ravel(), minlength=C)[:C]
                        quality.update(lab, gt, certainty=conf, pred=pred if conf is not None else None)
                        if gap_variance is not None:
                            gap_variance.update(lab, gt, certainty=np.exp(-var.astype(np.float32)), pred=pred)
                        if conf is not None:
                            valid = gt != 255
                            calib.update_numpy(conf[valid].astype(np.float32), (pred == gt)[valid])
                    if len(rows) < 6 and image_id in by_id:
                        rgb = read_image(by_id[image_id].image)
                        row = [rgb, plots.colorize(pred, source.palette), plots.colorize(lab, source.palette)]
                        if gt is not None:
                            row.insert(1, plots.colorize(gt, source.palette))
                        rows.append(row)
            _write_index(fh, ids_written, shapes_written)
            fh.attrs["classes"] = json.dumps(source.classes)
            fh.attrs["num_classes"] = C
            fh.attrs["columns"] = json.dumps(["label"] + (["weight"] if method == "variance" else []))
            fh.attrs["method"] = method
        with atomic_path(out / "labels.h5") as final:
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # a failed run leaves no half-written file
    if pcfg.export == "png":
        (export_dir / "list.txt").write_text("".join(f"{i}\t{i.replace('/', '__')}.png\n" for i in ids_written))

    pseudo_dist = kept_counts / max(kept_counts.sum(), 1)
    present = prior > 0
    kl = float(np.sum(prior[present] * (np.log(prior[present]) - np.log(pseudo_dist[present] + 1e-8))))
    report: dict[str, Any] = {
        "method": method,
        "alpha": alpha,
        "images": len(ids_written),
        "pixels": n_pixels,
        "kept_fraction": float(kept_counts.sum() / max(n_pixels, 1)),
        "kl_prior_pseudo": kl,
        "params": _jsonable({k: v for k, v in params.items() if k != "method"}),
        "per_class": {
            name: {
                "kept": int(kept_counts[c]),
                "predicted": int(pred_counts[c]),
                "kept_of_predicted": float(kept_counts[c] / pred_counts[c]) if pred_counts[c] else None,
                "prior": float(prior[c]),
            }
            for c, name in enumerate(source.classes)
        },
        "temperature": store.attrs.get("temperature"),
        "has_ground_truth": has_gt,
    }
    plots_dir = out / "plots"
    dists = {"labeled prior": prior, "pseudo-labels": pseudo_dist}
    if has_gt:
        q = quality.result()
        report.update(
            pseudo_miou=q["miou"],
            pseudo_miou_kept=q["miou_kept"],
            uncertainty_gap_conf=q["uncertainty_gap"],
            uncertainty_gap_variance=gap_variance.result()["uncertainty_gap"] if gap_variance else None,
            ece=calib.ece(),
        )
        for c, name in enumerate(source.classes):
            report["per_class"][name].update(
                precision=_jsonable(q["precision"][c]),
                coverage=_jsonable(q["coverage"][c]),
                iou=_jsonable(q["iou"][c]),
            )
        dists["ground truth"] = gt_counts / max(gt_counts.sum(), 1)
        rel = calib.reliability()
        plots.reliability(
            rel["bin_confidence"],
            rel["bin_accuracy"],
            rel["bin_count"],
            plots_dir / "reliability.png",
            f"teacher on unlabeled: ECE {report['ece']:.3f}",
        )
    plots.class_distributions(
        dists,
        source.classes,
        plots_dir / "class_distribution.png",
        f"{method}: KL(prior || pseudo) = {kl:.3f}",
    )
    if hists:
        _plot_hists(hists, hist_range, plots_dir / "histograms.png")
    if rows:
        titles = ["image"] + (["ground truth"] if has_gt else []) + ["prediction", f"pseudo-label ({method})"]
        plots.image_grid(rows, titles, plots_dir / "samples.png")
    return _jsonable(report)


def _plot_hists(hists: dict[str, np.ndarray], ranges: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(hists), figsize=(3.6 * len(hists), 3), squeeze=False)
    for ax, (name, counts) in zip(axes[0], hists.items(), strict=True):
        lo, hi = ranges[name]
        edges = np.linspace(lo, hi, len(counts) + 1)
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:gray")
        ax.set_yscale("log")
        ax.set_title(name)
    plots.save(fig, path)


def print_report(report: dict, classes: list[str], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(
        title=f"pseudo-labels: {report['method']} (kept {100 * report['kept_fraction']:.1f}%, "
        f"KL(prior||pseudo) {report['kl_prior_pseudo']:.3f})"
    )
    for col in ("class", "prior %", "kept %", "threshold", "precision", "coverage"):
        t.add_column(col, justify="right" if col != "class" else "left")
    thresholds = report["params"].get("thresholds")
    total_kept = max(sum(v["kept"] for v in report["per_class"].values()), 1)
    for c, name in enumerate(classes):
        pc = report["per_class"][name]

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"

        t.add_row(
            name,
            f"{100 * pc['prior']:.2f}",
            f"{100 * pc['kept'] / total_kept:.2f}",
            "-" if thresholds is None or thresholds[c] is None else f"{thresholds[c]:.4f}",
            pct(pc.get("precision")),
            pct(pc.get("coverage")),
        )
    console.print(t)
    if report.get("pseudo_miou") is not None:
        console.print(
            f"pseudo-label mIoU {100 * report['pseudo_miou']:.1f}  "
            f"uncertainty gap (conf) {report['uncertainty_gap_conf']:.3f}"
        )
