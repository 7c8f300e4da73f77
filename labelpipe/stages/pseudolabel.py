"""``labelpipe pseudolabel --method NAME``, NAME a registered generator (``labelpipe.pseudo.registry``).

Streams over the prediction store in at most two passes (``labelpipe.pseudo.streaming``): pass 1
fits the thresholds from float16 histograms, pass 2 labels the pixels and accumulates the report.
The store is read in chunks bounded in pixels (``pseudolabel.chunk_pixels``; images packed, larger ones
cut into bands of rows), each column a pass needs read once into reused buffers, so memory is flat in
the number and the size of the images; the labels do not depend on the chunk size.

Two entry points: :func:`run_pseudolabel` (a run's store, its data set's prior and ground truth) and
:func:`pseudolabel_store` (``--predictions FILE.h5 --out DIR``: any network's store, a prior from a file
or a mask folder, no model, run or data set). Under torchrun (WORLD_SIZE > 1) every rank histograms its
shard of the images, the histograms are summed across ranks, and every rank labels its shard: thresholds
and labels equal those of one process.

This path imports no torch (nor matplotlib unless plots are drawn): torch is loaded only to join and use
a process group when there are many processes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.dars import PIECE_PIXELS, skip_draws
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.pseudo.quality import PseudoQualityAccumulator
from labelpipe.pseudo.registry import PseudoLabelGenerator, get_generator
from labelpipe.pseudo.streaming import apply, fit_from_histogram, histogram_pass
from labelpipe.pseudo.validation import IGNORE_LABEL, clamp_nonnegative
from labelpipe.store.atomic import (
    atomic_path,
    atomic_write_json,
    reserve_space,
    sha256_file,
    sha256_json,
    temp_sibling,
)
from labelpipe.store.lock import run_lock, stage_name
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import LIBVER, PredictionStore, _chunks, _write_index, merge_parts

if TYPE_CHECKING:
    from rich.console import Console

    from labelpipe.config import RunConfig
    from labelpipe.metrics import CalibrationAccumulator

HIST_BINS = 64
HIST_RANGES = {"conf": (0.0, 1.0), "entropy": None, "variance": (0.0, 2.0)}  # entropy: (0, log C)
SAMPLE_ROWS = 6


# ------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Ranks:
    """This process's place among the ones labelling one store: ``rank`` of ``world``. Duck-types the
    ``rank`` / ``world`` / ``is_main`` of ``labelpipe.runtime.Runtime`` without importing torch."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_ranks() -> Ranks:
    """One process: ``Ranks()``, torch untouched. Under torchrun (WORLD_SIZE > 1): join the process group
    (gloo; the histograms and counts are CPU arrays) and return this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    from labelpipe.runtime import setup

    runtime = setup("cpu")
    return Ranks(runtime.rank, runtime.world)


def _sum_across(ranks: Ranks, array: np.ndarray) -> np.ndarray:
    """The element-wise sum of ``array`` (int64 or float64) over every rank; ``array`` itself with one."""
    if ranks.world <= 1:
        return array
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.distributed.get_backend() == "nccl":  # a group joined by a GPU stage moves CUDA tensors only
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().numpy()


def _gather(ranks: Ranks, obj: Any) -> list[Any]:
    if ranks.world <= 1:
        return [obj]
    from labelpipe.runtime import all_gather_objects

    return all_gather_objects(obj)


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        from labelpipe.runtime import barrier

        barrier()


def shard_of(n_images: int, ranks: Ranks) -> range:
    """The contiguous images of this rank: ``[n * rank / world, n * (rank + 1) / world)``."""
    return range(n_images * ranks.rank // ranks.world, n_images * (ranks.rank + 1) // ranks.world)


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Settings:
    """What a pseudolabel run computes with (the config's ``pseudolabel`` section, resolved).

    ``fields``: every setting that defines the result (``PseudolabelConfig.fingerprint_fields()``), what
    the fingerprint hashes and what a generator reads its settings from; the named attributes override it
    (``alpha`` per self-training round)."""

    method: str
    alpha: float
    tau: float
    alpha_t: float
    variance_percentile: float | None
    seed: int
    chunk_pixels: int
    export_png: bool = False
    plots: bool = True
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def generator(self) -> PseudoLabelGenerator:
        try:
            return get_generator(self.method)
        except ValueError as exc:
            raise LabelpipeError(str(exc)) from exc

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that define the labels, by config name: ``fields`` with the attributes applied."""
        return {
            **self.fields,
            "method": self.method,
            "alpha": self.alpha,
            "tau": self.tau,
            "alpha_t": self.alpha_t,
            "variance_percentile": self.variance_percentile,
            "export": "png" if self.export_png else "none",
        }


@dataclass
class GroundTruth:
    """Optional research inputs: masks of the store's images (quality metrics) and RGB images (samples)."""

    read_mask: Callable[[str], np.ndarray] | None = None  # image id -> (H, W) uint8 mask
    read_rgb: Callable[[str], np.ndarray] | None = None  # image id -> (H, W, 3) uint8 image
    sample_ids: set[str] = field(default_factory=set)


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


def _count_classes(values: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 counts of class ids < C in a flat integer array (255 and other ids ignored), a piece at a
    time: ``np.bincount`` of a whole chunk would make an 8-byte index copy of every pixel."""
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, values.size, PIECE_PIXELS):
        counts += np.bincount(values[start : start + PIECE_PIXELS], minlength=num_classes)[:num_classes]
    return counts


def _display_histogram(hist: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """``HIST_BINS`` equal-width bins over ``value_range`` from a (NUM_BINS,) histogram of non-negative
    float16 bit patterns (values outside the range are left out)."""
    values = np.arange(hist.size, dtype=np.uint16).view(np.float16).astype(np.float64)
    lo, hi = value_range
    inside = (values >= lo) & (values <= hi) & (hist > 0)
    bins = np.minimum(((values[inside] - lo) / (hi - lo) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    return np.bincount(bins, weights=hist[inside], minlength=HIST_BINS).astype(np.int64)


# ------------------------------------------------------------------------------------------- labelling
class _LabelsFile:
    """``labels.h5`` (or one rank's part of it) written band by band: an image's datasets are created at
    its first band and filled row range by row range."""

    def __init__(self, path: Path, with_weight: bool, compression: str) -> None:
        self.path = path
        self.compression = compression
        self.tmp = temp_sibling(path)
        self.file = h5py.File(self.tmp, "w", libver=LIBVER)
        self.group = self.file.create_group("images")
        self.with_weight = with_weight
        self.ids: list[str] = []
        self.shapes: list[tuple[int, int]] = []
        self._current: dict[str, h5py.Dataset] = {}

    def write(self, image_id: str, shape: tuple[int, int], rows: tuple[int, int], labels, weights) -> None:
        from labelpipe.store.prediction_store import compression_options, escape_id

        if not self.ids or self.ids[-1] != image_id:
            grp = self.group.create_group(escape_id(image_id))
            self._current = {}
            for name, dtype in (("label", labels.dtype), ("weight", np.float16)):
                if name == "weight" and not self.with_weight:
                    continue
                self._current[name] = grp.create_dataset(
                    name,
                    shape=shape,
                    dtype=dtype,
                    chunks=_chunks(shape),
                    **compression_options(self.compression, dtype),
                )
            self.ids.append(image_id)
            self.shapes.append(shape)
        self._current["label"][rows[0] : rows[1]] = labels
        if self.with_weight:
            self._current["weight"][rows[0] : rows[1]] = weights

    def close(self, attrs: dict[str, Any]) -> Path:
        _write_index(self.file, self.ids, self.shapes)
        for key, value in attrs.items():
            self.file.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        self.file.close()
        with atomic_path(self.path) as final:
            os.replace(self.tmp, final)
        return self.path

    def discard(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _compression_of(store: PredictionStore) -> str:
    """The compression of the store's label column, for labels.h5: a plain store (fast to read) gets
    plain labels, an lzf one (``predict``'s) lzf labels."""
    if not store.ids:
        return "none"
    from labelpipe.store.prediction_store import escape_id

    dataset = store.file["images"][escape_id(store.ids[0])]["label"]
    if dataset.compression == "gzip":
        return f"gzip-{dataset.compression_opts}"
    return "lzf" if dataset.compression == "lzf" else "none"


def _bands(chunk: dict) -> Iterator[tuple[str, int, tuple[int, int], slice]]:
    """(image id, image index, (first row, end row), slice of the chunk's flat arrays) per band."""
    offset = 0
    for image_id, (index, start, end), (rows, width) in zip(
        chunk["ids"], chunk["pieces"], chunk["shapes"], strict=True
    ):
        yield image_id, index, (start, end), slice(offset, offset + rows * width)
        offset += rows * width


def label_store(
    store: PredictionStore,
    out: Path,
    settings: Settings,
    classes: list[str],
    prior: np.ndarray,
    ranks: Ranks = Ranks(),
    truth: GroundTruth | None = None,
    palette: list[tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """Label ``store`` into ``out/labels.h5`` and return the report (JSON-able); draws the plots and the
    PNG export when ``settings`` asks. Every rank calls it with its ``ranks``; rank 0 writes the files
    and returns the full report (the others return theirs, for their shard only).

    prior: (C,) labeled class fractions (dars needs it; every method reports KL(prior || pseudo)).
    """
    method, generator, C = settings.method, settings.generator, len(classes)
    values = settings.fingerprint_fields()
    truth = truth or GroundTruth()
    has_gt = truth.read_mask is not None
    shard = shard_of(len(store.ids), ranks)
    shapes = store.shapes()
    chunks = settings.chunk_pixels

    # Pass 1: the histogram of this rank's shard, summed over the ranks, then the parameters.
    spec = generator.pass1(values)
    hist = None
    if spec is not None:
        hist = histogram_pass(
            method,
            store.iter_chunks(spec.columns(), max_pixels=chunks, images=shard, reuse_buffers=True),
            C,
            values,
        )
        assert hist is not None
        hist.counts[...] = _sum_across(ranks, hist.counts)
    params = fit_from_histogram(method, hist, C, prior, values)

    # Pass 2: what it reads. The method's columns; the research report also wants conf (calibration, the
    # confidence's uncertainty gap) and variance (its gap) when they are stored.
    value_key = generator.value_column
    wanted = list(generator.pass2_columns)
    if has_gt:
        wanted += [c for c in ("conf", "variance") if c in store.columns and c not in wanted]
    # Counts of the predicted classes and the value histogram for the plot come free from pass 1's
    # histogram where it is per class (cbst, dars) or of the same column (entropy, variance cut).
    pred_counts = hist.class_counts() if hist is not None and hist.num_classes == C else np.zeros(C, np.int64)
    count_pred = not (hist is not None and hist.num_classes == C)
    value_hist = None if (spec is not None and spec.column == value_key) else Float16Histogram(1)

    rng = np.random.default_rng(settings.seed)
    pixels_before = sum(shapes[i][0] * shapes[i][1] for i in range(shard.start))
    skip_draws(rng, pixels_before)  # this shard's draws start where the previous shards' end
    kept_counts = np.zeros(C, np.int64)
    gt_counts = np.zeros(C, np.int64)
    quality = PseudoQualityAccumulator(C, prior)
    gap_variance = PseudoQualityAccumulator(C, prior) if has_gt and "variance" in wanted else None
    calib = _calibration() if has_gt and "conf" in wanted else None
    n_pixels = 0
    mask_cache: tuple[str, np.ndarray] | None = None

    final = out / "labels.h5"
    part = final if ranks.world == 1 else out / f"labels.part-{ranks.rank:03d}.h5"
    writer = _LabelsFile(part, with_weight=generator.weights, compression=_compression_of(store))
    try:
        per_image = generator.labels_per_image(params)
        if per_image:  # a per-image rule (DARS exact counts) needs whole images: no band may cut one
            chunks = max([chunks, *(shapes[i][0] * shapes[i][1] for i in shard)])
        for chunk in store.iter_chunks(tuple(wanted), max_pixels=chunks, images=shard, reuse_buffers=True):
            image_pixels = [rows * width for rows, width in chunk["shapes"]] if per_image else None
            labels, weights = apply(method, params, chunk, rng, image_pixels)
            n_pixels += labels.size
            kept_counts += _count_classes(labels, C)
            if count_pred:
                pred_counts += _count_classes(chunk["label"], C)
            if value_hist is not None:
                value_hist.update(None, clamp_nonnegative(chunk[value_key]))
            for image_id, index, rows, flat in _bands(chunk):
                shape = (rows[1] - rows[0], shapes[index][1])
                lab = labels[flat].reshape(shape)
                writer.write(
                    image_id, shapes[index], rows, lab, None if weights is None else weights[flat].reshape(shape)
                )
                if has_gt:
                    if mask_cache is None or mask_cache[0] != image_id:
                        mask_cache = (image_id, _checked_mask(truth, image_id, shapes[index]))
                    gt = mask_cache[1][rows[0] : rows[1]]
                    pred = chunk["label"][flat].reshape(shape)
                    gt_counts += _count_classes(gt[gt != IGNORE_LABEL].ravel(), C)
                    conf = chunk["conf"][flat].reshape(shape) if "conf" in chunk else None
                    quality.update(lab, gt, certainty=conf, pred=pred if conf is not None else None)
                    if gap_variance is not None:
                        var = chunk["variance"][flat].reshape(shape)
                        gap_variance.update(lab, gt, certainty=np.exp(-var.astype(np.float32)), pred=pred)
                    if calib is not None and conf is not None:
                        valid = gt != IGNORE_LABEL
                        calib.update_numpy(conf[valid].astype(np.float32), (pred == gt)[valid])
        labels_attrs = {
            "classes": classes,
            "num_classes": C,
            "columns": ["label"] + (["weight"] if generator.weights else []),
            "method": method,
        }
        writer.close(labels_attrs)
    finally:
        writer.discard()

    # Every rank's counts, summed; rank 0 joins the parts into labels.h5 in store order.
    kept_counts = _sum_across(ranks, kept_counts)
    if count_pred:
        pred_counts = _sum_across(ranks, pred_counts)
    if value_hist is not None:
        value_hist.counts[...] = _sum_across(ranks, value_hist.counts)
    n_pixels = int(_sum_across(ranks, np.array([n_pixels], np.int64))[0])
    if has_gt:
        gt_counts = _sum_across(ranks, gt_counts)
        quality, gap_variance, calib = _merge_accumulators(ranks, quality, gap_variance, calib)
    if ranks.world > 1:
        _barrier(ranks)  # every part is complete
        if ranks.is_main:
            parts = [out / f"labels.part-{r:03d}.h5" for r in range(ranks.world)]
            merge_parts(parts, final, store.ids, labels_attrs)
            for p in parts:
                p.unlink()
        _barrier(ranks)
    if not ranks.is_main:
        return {}

    if settings.export_png:
        _export_png(final, out / "export", palette or [], C)
    value_counts = (hist if value_hist is None else value_hist).overall()
    value_range = HIST_RANGES.get(value_key) or (0.0, float(np.log(C)))
    return _report(
        method=method,
        settings=settings,
        classes=classes,
        prior=prior,
        params=params,
        n_images=len(store.ids),
        n_pixels=n_pixels,
        kept_counts=kept_counts,
        pred_counts=pred_counts,
        temperature=store.attrs.get("temperature"),
        quality=quality if has_gt else None,
        gap_variance=gap_variance,
        calib=calib,
        gt_counts=gt_counts,
        display={value_key: (_display_histogram(value_counts, value_range), value_range)},
        out=out,
        samples=_sample_rows(store, final, truth, palette) if settings.plots and truth.read_rgb else [],
    )


def _calibration() -> CalibrationAccumulator:
    from labelpipe.metrics import CalibrationAccumulator

    return CalibrationAccumulator()


def _checked_mask(truth: GroundTruth, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    assert truth.read_mask is not None
    mask = truth.read_mask(image_id)
    if mask.shape != tuple(shape):
        raise LabelpipeError(f"{image_id}: mask size {mask.shape} differs from the prediction's {tuple(shape)}")
    return mask


def _merge_accumulators(ranks: Ranks, quality, gap_variance, calib):
    """Rank 0 gets the sum of every rank's quality / calibration accumulators (their fields add up)."""
    if ranks.world <= 1:
        return quality, gap_variance, calib
    gathered = _gather(ranks, (quality, gap_variance, calib))
    for other in gathered[1:]:
        for mine, theirs in zip((quality, gap_variance), other[:2], strict=True):
            if mine is not None:
                mine.confusion += theirs.confusion
                mine.pseudo_counts += theirs.pseudo_counts
                mine.n_pixels += theirs.n_pixels
                mine._certainty += theirs._certainty
        if calib is not None:
            calib.count += other[2].count
            calib.conf_sum += other[2].conf_sum
            calib.correct_sum += other[2].correct_sum
    return quality, gap_variance, calib


def _export_png(labels_path: Path, export_dir: Path, palette: list[tuple[int, int, int]], C: int) -> None:
    """Palette PNGs of the labels, one image at a time (read back from labels.h5), and a list file."""
    from PIL import Image

    export_dir.mkdir(parents=True, exist_ok=True)
    lut = [v for rgb in palette for v in rgb] + [255] * 3 * (256 - len(palette))
    with PredictionStore(labels_path) as labels:
        for image_id in labels.ids:
            im = Image.fromarray(labels.read(image_id, ("label",))["label"], mode="P")
            im.putpalette(lut)
            im.save(export_dir / f"{image_id.replace('/', '__')}.png")
        (export_dir / "list.txt").write_text("".join(f"{i}\t{i.replace('/', '__')}.png\n" for i in labels.ids))


def _sample_rows(
    store: PredictionStore, labels_path: Path, truth: GroundTruth, palette: list[tuple[int, int, int]] | None
) -> list[list[np.ndarray]]:
    """Image | ground truth | prediction | pseudo-label rows of the first few sample images."""
    from labelpipe import plots

    rows = []
    with PredictionStore(labels_path) as labels:
        for image_id in [i for i in store.ids if i in truth.sample_ids][:SAMPLE_ROWS]:
            assert truth.read_rgb is not None
            pred = store.read(image_id, ("label",))["label"]
            lab = labels.read(image_id, ("label",))["label"]
            row = [truth.read_rgb(image_id), plots.colorize(pred, palette or []), plots.colorize(lab, palette or [])]
            if truth.read_mask is not None:
                row.insert(1, plots.colorize(truth.read_mask(image_id), palette or []))
            rows.append(row)
    return rows


def _report(
    *,
    method: str,
    settings: Settings,
    classes: list[str],
    prior: np.ndarray,
    params: dict[str, Any],
    n_images: int,
    n_pixels: int,
    kept_counts: np.ndarray,
    pred_counts: np.ndarray,
    temperature: Any,
    quality: PseudoQualityAccumulator | None,
    gap_variance: PseudoQualityAccumulator | None,
    calib: CalibrationAccumulator | None,
    gt_counts: np.ndarray,
    display: dict[str, tuple[np.ndarray, tuple[float, float]]],
    out: Path,
    samples: list[list[np.ndarray]],
) -> dict[str, Any]:
    pseudo_dist = kept_counts / max(kept_counts.sum(), 1)
    present = prior > 0
    kl = float(np.sum(prior[present] * (np.log(prior[present]) - np.log(pseudo_dist[present] + 1e-8))))
    report: dict[str, Any] = {
        "method": method,
        "alpha": settings.alpha,
        "images": n_images,
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
            for c, name in enumerate(classes)
        },
        "temperature": temperature,
        "has_ground_truth": quality is not None,
        "histograms": {
            name: {"range": list(value_range), "counts": counts.tolist()}
            for name, (counts, value_range) in display.items()
        },
    }
    dists = {"labeled prior": prior, "pseudo-labels": pseudo_dist}
    if quality is not None:
        q = quality.result()
        report.update(
            pseudo_miou=q["miou"],
            pseudo_miou_kept=q["miou_kept"],
            uncertainty_gap_conf=q["uncertainty_gap"],
            uncertainty_gap_variance=gap_variance.result()["uncertainty_gap"] if gap_variance else None,
            ece=calib.ece() if calib is not None else None,
        )
        for c, name in enumerate(classes):
            report["per_class"][name].update(
                precision=_jsonable(q["precision"][c]),
                coverage=_jsonable(q["coverage"][c]),
                iou=_jsonable(q["iou"][c]),
            )
        dists["ground truth"] = gt_counts / max(gt_counts.sum(), 1)
    if settings.plots:
        _draw_plots(report, classes, dists, display, calib, samples, out / "plots")
    return _jsonable(report)


def _draw_plots(report, classes, dists, display, calib, samples, plots_dir: Path) -> None:
    from labelpipe import plots  # matplotlib is imported by the first figure, only when plots are drawn

    method = report["method"]
    if calib is not None:
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
        classes,
        plots_dir / "class_distribution.png",
        f"{method}: KL(prior || pseudo) = {report['kl_prior_pseudo']:.3f}",
    )
    _plot_hists(
        {k: v[0] for k, v in display.items()}, {k: v[1] for k, v in display.items()}, plots_dir / "histograms.png"
    )
    if samples:
        has_gt = report["has_ground_truth"]
        titles = ["image"] + (["ground truth"] if has_gt else []) + ["prediction", f"pseudo-label ({method})"]
        plots.image_grid(samples, titles, plots_dir / "samples.png")


def _plot_hists(hists: dict[str, np.ndarray], ranges: dict, path: Path) -> None:
    from labelpipe import plots

    plt = plots.plt
    fig, axes = plt.subplots(1, len(hists), figsize=(3.6 * len(hists), 3), squeeze=False)
    for ax, (name, counts) in zip(axes[0], hists.items(), strict=True):
        lo, hi = ranges[name]
        edges = np.linspace(lo, hi, len(counts) + 1)
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:gray")
        ax.set_yscale("log")
        ax.set_title(name)
    plots.save(fig, path)


def _prepare_out(out: Path, settings: Settings) -> None:
    # Files of an earlier run are not this run's: PNGs, plots, stray parts of a killed many-process run.
    shutil.rmtree(out / "export", ignore_errors=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    for stale in out.glob("labels.part-*.h5"):
        stale.unlink()


def _outputs(settings: Settings) -> list[str]:
    return ["labels.h5", "report.json"] + (["export/list.txt"] if settings.export_png else [])


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("kept_fraction", "kl_prior_pseudo", "pseudo_miou") if report.get(k) is not None}


# ------------------------------------------------------------------------------------ a run's store
def _store_hash(store_path: Path, run_dir: Path) -> str:
    """The sha256 of the prediction store, checked: a store ``predict`` wrote must still be the file its
    manifest records (size, and hash unless untouched) and ``predict`` must have finished; a store made
    elsewhere (no predict manifest beside it) is hashed."""
    stage = StageDir(store_path.parent)
    manifest = stage.manifest()
    if manifest is None or manifest.get("stage") != "predict":
        return sha256_file(store_path)
    command = "predict" if store_path.parent == run_dir / "predict" else "selftrain"
    stage.check_output(store_path.name, f"labelpipe {command} --run {run_dir}")
    return manifest["outputs"][store_path.name]


def _check_store_model(run_dir: Path, store_path: Path, attrs: dict) -> None:
    """A store must come from the run's current model of its name (a re-pretrain makes it stale)."""
    from labelpipe.context import checked_model_path

    name, made_by = attrs.get("model"), attrs.get("model_sha256")
    if not isinstance(name, str) or not made_by:
        return
    try:
        path = checked_model_path(run_dir, name)
    except LabelpipeError:
        return  # no such model in this run (a store from elsewhere): nothing to compare with
    current = (StageDir(path.parent).manifest() or {}).get("outputs", {}).get(path.name) or sha256_file(path)
    if current != made_by:
        command = "predict" if store_path.parent == run_dir / "predict" else "selftrain"
        raise LabelpipeError(
            f"{store_path}: made by an earlier {name} model (the run's model has changed since); run "
            f"`labelpipe {command} --run {run_dir}` to predict with the current one"
        )


def settings_from(config: RunConfig, alpha: float | None = None) -> Settings:
    pcfg = config.pseudolabel
    return Settings(
        method=pcfg.method,
        alpha=pcfg.alpha if alpha is None else alpha,
        tau=pcfg.tau,
        alpha_t=pcfg.alpha_t,
        variance_percentile=pcfg.variance_percentile,
        seed=config.seed,
        chunk_pixels=pcfg.chunk_pixels,
        export_png=pcfg.export == "png",
        plots=pcfg.plots,
        fields=pcfg.fingerprint_fields(),
    )


def run_pseudolabel(
    config: RunConfig,
    run_dir: Path,
    runtime: Any,
    force: bool = False,
    store_path: Path | None = None,
    out_dir: Path | None = None,
    alpha: float | None = None,
    quiet: bool = False,
    sharded: bool = False,
) -> Path:
    """:func:`_pseudolabel` holding the stage's lock in the run (rank 0 takes it)."""
    stage_dir = out_dir or run_dir / "pseudolabel" / config.pseudolabel.method
    with run_lock(run_dir, stage_name(run_dir, stage_dir), enabled=runtime.is_main):
        return _pseudolabel(config, run_dir, runtime, force, store_path, out_dir, alpha, quiet, sharded)


def _pseudolabel(
    config: RunConfig,
    run_dir: Path,
    runtime: Any,
    force: bool,
    store_path: Path | None,
    out_dir: Path | None,
    alpha: float | None,
    quiet: bool,
    sharded: bool,
) -> Path:
    """Pseudo-labels of a run's store (default ``RUN/predict/predictions.h5``) into
    ``RUN/pseudolabel/METHOD`` (or ``out_dir``). ``runtime``: anything with ``rank``, ``world`` and
    ``is_main`` (a ``labelpipe.runtime.Runtime`` or :class:`Ranks`). With ``sharded`` every rank labels
    its share of the images (the CLI under torchrun); otherwise rank 0 does it all (``selftrain``)."""
    from labelpipe import context as common

    ranks = Ranks(runtime.rank, runtime.world) if sharded else Ranks()
    ctx = common.open_context(config, run_dir, runtime)
    config = ctx.config  # with defaults that depend on the data resolved
    settings = settings_from(config, alpha)
    store_path = store_path or run_dir / "predict" / "predictions.h5"
    stage = StageDir(out_dir or run_dir / "pseudolabel" / settings.method)
    if not runtime.is_main and not sharded:
        return stage.path / "labels.h5"
    prior_split = config.pseudolabel.prior_from or ctx.roles["labeled"]
    source = ctx.source
    store_hash = _store_hash(store_path, run_dir) if store_path.is_file() else ""  # checked before it is read
    with PredictionStore(store_path, source.num_classes, require=settings.generator.pass2_columns) as store:
        _check_store_model(run_dir, store_path, store.attrs)
        inputs = {
            **settings.fingerprint_fields(),
            "seed": settings.seed,
            "prior_from": prior_split,  # resolved: None means the labeled split
            "prior_ids": ctx.split_ids_fingerprint(prior_split),
            "store": store_hash,
        }
        fingerprint = sha256_json(inputs)
        up_to_date = _gather(ranks, not force and stage.is_up_to_date(fingerprint))[0]
        if up_to_date:
            if not quiet and runtime.is_main:
                print(f"pseudolabel: up to date ({stage.path}); use --force to redo")
            return stage.path / "labels.h5"
        prior = common.class_prior(ctx, prior_split)  # validates the prior's masks before anything is written
        if hasattr(common, "write_config"):
            common.write_config(ctx)
        # Cheap and deterministic (seeded): redone whole, never resumed.
        if ranks.is_main:
            stage.begin("pseudolabel", fingerprint, inputs)
            _prepare_out(stage.path, settings)
            # HDF5 cannot fail cleanly on a full disk: the labels (uint8, lzf) take well under half the store.
            reserve_space(stage.path, store_path.stat().st_size // 2 + (1 << 20), stage.path / "labels.h5")
        _barrier(ranks)
        split = store.attrs.get("split", ctx.roles["unlabeled"])
        by_id = {s.id: s for s in source.split(split)} if split in source.splits else {}
        # Ground truth only where every image of the store has a mask (research splits such as DigitScapes').
        has_gt = bool(by_id) and all(i in by_id and by_id[i].mask is not None for i in store.ids)
        truth = GroundTruth(
            read_mask=(lambda i: source.read_mask(by_id[i].mask)) if has_gt else None,
            read_rgb=_rgb_reader(by_id) if by_id else None,
            sample_ids=set(by_id),
        )
        report = label_store(store, stage.path, settings, source.classes, prior, ranks, truth, source.palette)
    if not ranks.is_main:
        return stage.path / "labels.h5"
    atomic_write_json(stage.path / "report.json", report)
    stage.finish(_outputs(settings), _summary(report))
    if not quiet:
        print_report(report, source.classes)
    return stage.path / "labels.h5"


def _rgb_reader(by_id: dict) -> Callable[[str], np.ndarray]:
    def read(image_id: str) -> np.ndarray:
        from labelpipe.data import read_image

        return read_image(by_id[image_id].image)

    return read


# ------------------------------------------------------------------------ bring your own predictions
def read_prior(path: Path, classes: list[str]) -> np.ndarray:
    """A (C,) class prior from ``path``: ``.npy`` (C,) fractions or counts, or ``.json`` (a list, or a
    {class name: value} object covering every class). Normalised to sum 1."""
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                missing = [c for c in classes if c not in data]
                if missing:
                    raise LabelpipeError(f"--prior {path}: no value for class(es) {', '.join(missing[:5])}")
                data = [data[c] for c in classes]
            values = np.asarray(data, dtype=np.float64)
        else:
            raise LabelpipeError(f"--prior {path}: expected a .json or .npy file")
    except (OSError, ValueError) as exc:
        raise LabelpipeError(f"--prior {path}: cannot read a class prior ({exc})") from exc
    return _normalised_prior(np.asarray(values, dtype=np.float64).reshape(-1), len(classes), f"--prior {path}")


def prior_from_masks(mask_dir: Path, num_classes: int, ignore_index: int = IGNORE_LABEL) -> np.ndarray:
    """The class prior from every PNG mask under ``mask_dir`` (class ids per pixel, ``ignore_index``
    excluded; palette PNGs give their indices)."""
    from PIL import Image

    if not mask_dir.is_dir():
        raise LabelpipeError(f"--prior-from {mask_dir}: not a directory of masks")
    counts = np.zeros(num_classes, np.int64)
    files = sorted(mask_dir.rglob("*.png"))
    if not files:
        raise LabelpipeError(f"--prior-from {mask_dir}: no .png masks found")
    for path in files:
        with Image.open(path) as im:
            mask = np.asarray(im)
        if mask.ndim != 2:
            raise LabelpipeError(f"{path}: a mask must be single-channel class ids, got shape {mask.shape}")
        valid = mask[mask != ignore_index]
        if valid.size and int(valid.max()) >= num_classes:
            raise LabelpipeError(f"{path}: class id {int(valid.max())} but the store has {num_classes} classes")
        counts += _count_classes(valid.ravel(), num_classes)
    return _normalised_prior(counts.astype(np.float64), num_classes, f"--prior-from {mask_dir}")


def _normalised_prior(values: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    if values.size != num_classes:
        raise LabelpipeError(f"{what}: {values.size} values but the store has {num_classes} classes")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise LabelpipeError(f"{what}: a prior needs finite, non-negative values with a positive sum")
    return values / values.sum()


def pseudolabel_store(
    predictions: Path,
    out: Path,
    settings: Settings,
    prior: Path | None = None,
    prior_from: Path | None = None,
    ranks: Ranks = Ranks(),
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """``labelpipe pseudolabel --predictions FILE.h5 --out DIR``: label any prediction store (see
    :mod:`labelpipe.store.writer`) without a model, run or data set. The prior comes from ``prior``
    (json / npy) or the masks under ``prior_from``; methods other than dars use it only for the report
    (without one, a uniform prior is reported for them)."""
    if prior is not None and prior_from is not None:
        raise LabelpipeError("--prior and --prior-from: give one of them")
    generator = settings.generator
    with PredictionStore(predictions, require=generator.pass2_columns) as store:
        classes = [str(c) for c in store.attrs.get("classes") or []]
        C = store.attrs.get("num_classes")
        if not isinstance(C, int) or C < 1:
            raise LabelpipeError(f"{predictions}: the store's num_classes attribute is missing or invalid")
        classes = classes if len(classes) == C else [f"class{c}" for c in range(C)]
        if prior is not None:
            prior_values = read_prior(prior, classes)
        elif prior_from is not None:
            prior_values = prior_from_masks(prior_from, C)
        elif generator.needs_prior:
            raise LabelpipeError(
                f"--method {settings.method} needs the labeled class prior: pass --prior FILE or --prior-from DIR"
            )
        else:
            prior_values = np.full(C, 1.0 / C)
        stat = predictions.stat()
        inputs = {
            **settings.fingerprint_fields(),
            "seed": settings.seed,
            "prior": prior_values.tolist(),  # hashed by value: it comes from a file, not a split
            # size and mtime, not a hash: reading a 100 GB store twice to fingerprint it is not cheap
            "store": {"path": str(predictions.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        }
        inputs.pop("prior_from", None)  # --prior-from DIR: its masks are hashed as the prior's values
        fingerprint = sha256_json(inputs)
        stage = StageDir(out)
        if _gather(ranks, not force and stage.is_up_to_date(fingerprint))[0]:
            if not quiet and ranks.is_main:
                print(f"pseudolabel: up to date ({out}); use --force to redo")
            return out / "labels.h5"
        if ranks.is_main:
            stage.begin("pseudolabel", fingerprint, inputs)
            _prepare_out(out, settings)
        _barrier(ranks)
        report = label_store(store, out, settings, classes, prior_values, ranks)
    if not ranks.is_main:
        return out / "labels.h5"
    atomic_write_json(out / "report.json", report)
    stage.finish(_outputs(settings), _summary(report))
    if not quiet:
        print_report(report, classes)
    return out / "labels.h5"


# ------------------------------------------------------------------------------------------- printing
def print_report(report: dict, classes: list[str], console: Console | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

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
