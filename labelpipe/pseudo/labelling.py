"""Labelling a prediction store: ``labels.h5`` and the report, for any registered generator.

:func:`label_store` streams over the store in at most two passes (``labelpipe.pseudo.streaming``):
pass 1 fits the thresholds from float16 histograms, pass 2 labels the pixels and accumulates the
report. The store is read in chunks bounded in pixels (``pseudolabel.chunk_pixels``; images packed,
larger ones cut into bands of rows), each column a pass needs read once into reused buffers, so memory
is flat in the number and the size of the images; the labels do not depend on the chunk size. Under
torchrun every rank histograms its shard of the images, the histograms are summed across ranks, and
every rank labels its shard: thresholds and labels equal those of one process.

The stage directory around it (fingerprint, manifest, ``report.json``): :func:`labels_up_to_date`,
:func:`begin_labels`, :func:`finish_labels`, shared by ``labelpipe pseudolabel`` (a run's store or
``--predictions``) and self-training's rounds (``labelpipe.pseudo.run_store``).

No torch here (nor matplotlib unless plots are drawn): torch is loaded only to join and use a process
group when there are many processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from labelpipe.defaults import pseudolabel_fingerprint_fields
from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.dars import skip_draws
from labelpipe.pseudo.histogram import NUM_BINS, Float16Histogram
from labelpipe.pseudo.prior import count_classes
from labelpipe.pseudo.quality import PseudoQualityAccumulator
from labelpipe.pseudo.ranks import Ranks, barrier, gather, shard_of, sum_across
from labelpipe.pseudo.registry import Histogram, PseudoLabelGenerator, get_generator
from labelpipe.pseudo.report import HIST_RANGES, build_report, display_histogram, print_report, sample_rows, summary
from labelpipe.pseudo.streaming import apply, fit_from_histogram, histogram_pass
from labelpipe.pseudo.validation import IGNORE_LABEL, clamp_nonnegative
from labelpipe.store.atomic import atomic_path, atomic_write_json, reserve_space, temp_sibling
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import (
    LIBVER,
    PredictionStore,
    chunk_shape,
    compression_options,
    escape_id,
    merge_parts,
    write_index,
)

if TYPE_CHECKING:
    from labelpipe.config import RunConfig
    from labelpipe.metrics import CalibrationAccumulator


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


def settings_from(config: RunConfig, alpha: float | None = None) -> Settings:
    """The :class:`Settings` of ``config`` (its ``pseudolabel`` section and seed); ``alpha`` overrides."""
    return settings_from_values(config.pseudolabel.model_dump(mode="json"), config.seed, alpha)


def settings_from_values(values: Mapping[str, Any], seed: int, alpha: float | None = None) -> Settings:
    """The :class:`Settings` of a ``pseudolabel`` section given as plain values (every field, by name, as
    ``PseudolabelConfig.model_dump`` gives them; validated by the caller) and a seed. The lean
    ``--predictions`` path (:mod:`labelpipe.entry`) builds them without pydantic."""
    return Settings(
        method=values["method"],
        alpha=values["alpha"] if alpha is None else alpha,
        tau=values["tau"],
        alpha_t=values["alpha_t"],
        variance_percentile=values["variance_percentile"],
        seed=seed,
        chunk_pixels=values["chunk_pixels"],
        export_png=values["export"] == "png",
        plots=values["plots"],
        fields=pseudolabel_fingerprint_fields(values),
    )


@dataclass
class GroundTruth:
    """Optional research inputs: masks of the store's images (quality metrics) and RGB images (samples)."""

    read_mask: Callable[[str], np.ndarray] | None = None  # image id -> (H, W) uint8 mask
    read_rgb: Callable[[str], np.ndarray] | None = None  # image id -> (H, W, 3) uint8 image
    sample_ids: set[str] = field(default_factory=set)


# ------------------------------------------------------------------------------------------- labelling
class LabelsFile:
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
        self._current: dict[str, h5py.h5d.DatasetID] = {}
        self._dcpl: dict[tuple[str, tuple[int, ...]], h5py.h5p.PropDCID] = {}

    def write(self, image_id: str, shape: tuple[int, int], rows: tuple[int, int], labels, weights) -> None:
        """Rows ``rows`` (first, end) of image ``image_id`` of size ``shape``: labels (and weights)."""
        if not self.ids or self.ids[-1] != image_id:
            group = h5py.h5g.create(self.group.id, escape_id(image_id).encode())
            self._current = {"label": self._create(group, "label", shape, labels.dtype)}
            if self.with_weight:
                self._current["weight"] = self._create(group, "weight", shape, np.dtype(np.float16))
            self.ids.append(image_id)
            self.shapes.append(shape)
        whole = rows == (0, shape[0])
        self._write_rows(self._current["label"], rows, labels, whole)
        if self.with_weight:
            self._write_rows(self._current["weight"], rows, weights, whole)

    def _create(
        self, group: h5py.h5g.GroupID, name: str, shape: tuple[int, int], dtype: np.dtype
    ) -> h5py.h5d.DatasetID:
        """A dataset of ``shape`` through HDF5's own calls, with the creation properties (chunks, filters)
        h5py made for the first dataset of its dtype and chunk shape: h5py's high-level creation and
        selection cost ~0.2 ms an image, a sixth of labelling a 256 x 512 map."""
        key = (dtype.str, chunk_shape(shape, self.compression))
        dcpl = self._dcpl.get(key)
        if dcpl is None:
            options = compression_options(self.compression, dtype)
            dataset = h5py.Group(group).create_dataset(name, shape=shape, dtype=dtype, chunks=key[1], **options)
            self._dcpl[key] = dataset.id.get_create_plist()
            return dataset.id
        space = h5py.h5s.create_simple(shape)
        return h5py.h5d.create(group, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)

    @staticmethod
    def _write_rows(dataset: h5py.h5d.DatasetID, rows: tuple[int, int], values: np.ndarray, whole: bool) -> None:
        values = np.ascontiguousarray(values)
        if whole:  # the image in one write: no selections to make
            dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, values)
            return
        file_space = dataset.get_space()
        file_space.select_hyperslab((rows[0], 0), values.shape)
        dataset.write(h5py.h5s.create_simple(values.shape), file_space, values)

    def close(self, attrs: dict[str, Any]) -> Path:
        write_index(self.file, self.ids, self.shapes)
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


def compression_of(store: PredictionStore) -> str:
    """The compression of the store's label column, for labels.h5: a plain store (fast to read) gets
    plain labels, an lzf one (``predict``'s) lzf labels."""
    if not store.ids:
        return "none"
    dataset = store.file["images"][escape_id(store.ids[0])]["label"]
    if dataset.compression == "gzip":
        return f"gzip-{dataset.compression_opts}"
    return "lzf" if dataset.compression == "lzf" else "none"


def bands(chunk: dict) -> Iterator[tuple[str, int, tuple[int, int], slice]]:
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
    shard = shard_of(len(store.ids), ranks)

    # Pass 1: the histogram of this rank's shard, summed over the ranks, then the parameters.
    spec = generator.pass1(values)
    hist = None if spec is None else _stored_histogram(store, spec, C)
    if spec is not None and hist is None:
        hist = _summed_histogram(store, settings, spec.columns(), C, shard, ranks)
    params = fit_from_histogram(method, hist, C, prior, values)

    # Pass 2: label this rank's shard into its labels file, counting what the report needs.
    columns = _pass2_columns(generator, store, truth)
    tally = _Pass2Tally(C, prior, truth, columns, generator.value_column, hist, spec)
    final = out / "labels.h5"
    labels_attrs = {
        "classes": classes,
        "num_classes": C,
        "columns": ["label"] + (["weight"] if generator.weights else []),
        "method": method,
    }
    writer = LabelsFile(
        final if ranks.world == 1 else _part_path(out, ranks.rank),
        with_weight=generator.weights,
        compression=compression_of(store),
    )
    try:
        _label_shard(store, settings, params, shard, columns, writer, tally)
        writer.close(labels_attrs)
    finally:
        writer.discard()

    # Every rank's counts, summed; rank 0 joins the parts into labels.h5 in store order.
    tally.sum_across(ranks)
    if ranks.world > 1:
        _join_parts(out, final, store.ids, labels_attrs, ranks)
    if not ranks.is_main:
        return {}

    if settings.export_png:
        export_png(final, out / "export", palette or [], C)
    value_key = generator.value_column
    value_counts = (hist if tally.value_hist is None else tally.value_hist).overall()
    value_range = HIST_RANGES.get(value_key) or (0.0, float(np.log(C)))
    return build_report(
        method=method,
        settings=settings,
        classes=classes,
        prior=prior,
        params=params,
        n_images=len(store.ids),
        n_pixels=tally.n_pixels,
        kept_counts=tally.kept_counts,
        pred_counts=tally.pred_counts,
        temperature=store.attrs.get("temperature"),
        quality=tally.quality if tally.has_gt else None,
        gap_variance=tally.gap_variance,
        calib=tally.calib,
        gt_counts=tally.gt_counts,
        display={value_key: (display_histogram(value_counts, value_range), value_range)},
        out=out,
        samples=sample_rows(store, final, truth, palette) if settings.plots and truth.read_rgb else [],
    )


def _stored_histogram(store: PredictionStore, spec: Histogram, C: int) -> Float16Histogram | None:
    """Pass 1's histogram as the store's writer counted it (``PredictionWriter``: the whole store, so every
    rank reads the same), or None when the store carries none (``predict``'s stores, other writers): then
    pass 1 reads the store. Summed over the classes when the method histograms all pixels together."""
    counts = store.stored_histogram(spec.column, C, NUM_BINS)
    if counts is None:
        return None
    return Float16Histogram.from_counts(counts if spec.per_class else counts.sum(axis=0, keepdims=True))


def _summed_histogram(
    store: PredictionStore, settings: Settings, columns: tuple[str, ...], C: int, shard: range, ranks: Ranks
) -> Float16Histogram:
    """Pass 1's histogram of ``columns`` over this rank's ``shard``, summed over the ranks (on every rank)."""
    chunks = store.iter_chunks(columns, max_pixels=settings.chunk_pixels, images=shard, reuse_buffers=True)
    hist = histogram_pass(settings.method, chunks, C, settings.fingerprint_fields())
    assert hist is not None  # the method has a pass 1
    hist.counts[...] = sum_across(ranks, hist.counts)
    return hist


def _pass2_columns(generator: PseudoLabelGenerator, store: PredictionStore, truth: GroundTruth) -> list[str]:
    """The store columns pass 2 reads: the method's; the research report also wants conf (calibration,
    the confidence's uncertainty gap) and variance (its gap) when they are stored."""
    wanted = list(generator.pass2_columns)
    if truth.read_mask is not None:
        wanted += [c for c in ("conf", "variance") if c in store.columns and c not in wanted]
    return wanted


class _Pass2Tally:
    """What pass 2 counts for the report besides writing the labels: the kept and predicted class counts,
    the pixels, the value histogram of the plot and, with ground truth, its class counts and the quality,
    uncertainty-gap and calibration accumulators. Each rank counts its shard; :meth:`sum_across` totals."""

    def __init__(
        self,
        C: int,
        prior: np.ndarray,
        truth: GroundTruth,
        columns: list[str],
        value_key: str,
        hist: Float16Histogram | None,
        spec: Any,
    ) -> None:
        self.C, self.truth, self.value_key = C, truth, value_key
        self.has_gt = truth.read_mask is not None
        # Counts of the predicted classes and the value histogram for the plot come free from pass 1's
        # histogram where it is per class (cbst, dars) or of the same column (entropy, variance cut).
        self.count_pred = not (hist is not None and hist.num_classes == C)
        self.pred_counts = np.zeros(C, np.int64) if self.count_pred else hist.class_counts()
        self.value_hist = None if (spec is not None and spec.column == value_key) else Float16Histogram(1)
        self.kept_counts = np.zeros(C, np.int64)
        self.gt_counts = np.zeros(C, np.int64)
        self.n_pixels = 0
        self.quality = PseudoQualityAccumulator(C, prior)
        self.gap_variance = PseudoQualityAccumulator(C, prior) if self.has_gt and "variance" in columns else None
        self.calib = _calibration() if self.has_gt and "conf" in columns else None
        self._mask: tuple[str, np.ndarray] | None = None  # the image whose mask was read last, and its mask

    def add_chunk(self, chunk: dict, labels: np.ndarray) -> None:
        """A chunk's labels (flat, all its bands) and the predictions and values they came from."""
        self.n_pixels += labels.size
        self.kept_counts += count_classes(labels, self.C)
        if self.count_pred:
            self.pred_counts += count_classes(chunk["label"], self.C)
        if self.value_hist is not None:
            self.value_hist.update(None, clamp_nonnegative(chunk[self.value_key]))

    def add_band_truth(
        self, image_id: str, image_shape: tuple[int, int], rows: tuple[int, int], labels: np.ndarray, band: dict
    ) -> None:
        """One band's (rows, W) labels against the ground truth of its rows; ``band``: the chunk's columns
        of the band, reshaped to (rows, W)."""
        if self._mask is None or self._mask[0] != image_id:
            self._mask = (image_id, _checked_mask(self.truth, image_id, image_shape))
        gt = self._mask[1][rows[0] : rows[1]]
        pred = band["label"]
        self.gt_counts += count_classes(gt[gt != IGNORE_LABEL].ravel(), self.C)
        conf = band.get("conf")
        self.quality.update(labels, gt, certainty=conf, pred=pred if conf is not None else None)
        if self.gap_variance is not None:
            var = band["variance"]
            self.gap_variance.update(labels, gt, certainty=np.exp(-var.astype(np.float32)), pred=pred)
        if self.calib is not None and conf is not None:
            valid = gt != IGNORE_LABEL
            self.calib.update_numpy(conf[valid].astype(np.float32), (pred == gt)[valid])

    def sum_across(self, ranks: Ranks) -> None:
        """Every rank's counts summed (on every rank); the accumulators merged on rank 0."""
        self.kept_counts = sum_across(ranks, self.kept_counts)
        if self.count_pred:
            self.pred_counts = sum_across(ranks, self.pred_counts)
        if self.value_hist is not None:
            self.value_hist.counts[...] = sum_across(ranks, self.value_hist.counts)
        self.n_pixels = int(sum_across(ranks, np.array([self.n_pixels], np.int64))[0])
        if self.has_gt:
            self.gt_counts = sum_across(ranks, self.gt_counts)
            self.quality, self.gap_variance, self.calib = _merge_accumulators(
                ranks, self.quality, self.gap_variance, self.calib
            )


def _label_shard(
    store: PredictionStore,
    settings: Settings,
    params: Any,
    shard: range,
    columns: list[str],
    writer: LabelsFile,
    tally: _Pass2Tally,
) -> None:
    """Pass 2 over this rank's ``shard`` of images: label each chunk, write it band by band, count it.

    The random draws (ties, DARS) continue where the previous shards' end, so the labels do not depend
    on the number of ranks."""
    shapes = store.shapes()
    rng = np.random.default_rng(settings.seed)
    skip_draws(rng, sum(shapes[i][0] * shapes[i][1] for i in range(shard.start)))
    per_image = settings.generator.labels_per_image(params)
    chunks = settings.chunk_pixels
    if per_image:  # a per-image rule (DARS exact counts) needs whole images: no band may cut one
        chunks = max([chunks, *(shapes[i][0] * shapes[i][1] for i in shard)])
    for chunk in store.iter_chunks(tuple(columns), max_pixels=chunks, images=shard, reuse_buffers=True):
        image_pixels = [rows * width for rows, width in chunk["shapes"]] if per_image else None
        labels, weights = apply(settings.method, params, chunk, rng, image_pixels)
        tally.add_chunk(chunk, labels)
        for image_id, index, rows, flat in bands(chunk):
            shape = (rows[1] - rows[0], shapes[index][1])
            lab = labels[flat].reshape(shape)
            writer.write(image_id, shapes[index], rows, lab, None if weights is None else weights[flat].reshape(shape))
            if tally.has_gt:
                band = {c: chunk[c][flat].reshape(shape) for c in ("label", "conf", "variance") if c in chunk}
                tally.add_band_truth(image_id, shapes[index], rows, lab, band)


def _part_path(out: Path, rank: int) -> Path:
    """One rank's labels file under many processes, joined into labels.h5 by rank 0."""
    return out / f"labels.part-{rank:03d}.h5"


def _join_parts(out: Path, final: Path, ids: list[str], attrs: dict[str, Any], ranks: Ranks) -> None:
    """Rank 0 joins every rank's part into ``final`` in store order (``ids``), once all are complete."""
    barrier(ranks)  # every part is complete
    if ranks.is_main:
        parts = [_part_path(out, r) for r in range(ranks.world)]
        merge_parts(parts, final, ids, attrs)
        for p in parts:
            p.unlink()
    barrier(ranks)


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
    gathered = gather(ranks, (quality, gap_variance, calib))
    for other in gathered[1:]:
        for mine, theirs in zip((quality, gap_variance, calib), other, strict=True):
            if mine is not None:
                mine.merge(theirs)
    return quality, gap_variance, calib


def export_png(labels_path: Path, export_dir: Path, palette: list[tuple[int, int, int]], C: int) -> None:
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


# ------------------------------------------------------------------------------ the stage directory
def labels_up_to_date(stage: StageDir, fingerprint: str, ranks: Ranks, force: bool, quiet: bool) -> bool:
    """Whether ``stage`` already holds the labels of ``fingerprint`` (rank 0's answer, on every rank);
    says so unless ``quiet``. Labelling is cheap and deterministic (seeded): redone whole, never resumed."""
    if not gather(ranks, not force and stage.is_up_to_date(fingerprint))[0]:
        return False
    if not quiet and ranks.is_main:
        print(f"pseudolabel: up to date ({stage.path}); use --force to redo")
    return True


def begin_labels(
    stage: StageDir, settings: Settings, fingerprint: str, inputs: dict, ranks: Ranks, reserve: int = 0
) -> None:
    """Rank 0 starts the stage's manifest, removes an earlier run's files (PNGs, plots, stray parts of a
    killed many-process run: they are not this run's) and reserves ``reserve`` bytes for labels.h5;
    every rank waits for it."""
    if ranks.is_main:
        stage.begin("pseudolabel", fingerprint, inputs)
        for earlier in ("export", "plots"):
            if (stage.path / earlier).exists():
                import shutil

                shutil.rmtree(stage.path / earlier, ignore_errors=True)
        for stale in stage.path.glob("labels.part-*.h5"):
            stale.unlink()
        if reserve:
            reserve_space(stage.path, reserve, stage.path / "labels.h5")
    barrier(ranks)


def finish_labels(
    stage: StageDir, settings: Settings, report: dict, classes: list[str], ranks: Ranks, quiet: bool
) -> Path:
    """Rank 0 writes ``report.json``, completes the manifest and prints the report (unless ``quiet``);
    returns the path of labels.h5 on every rank."""
    if ranks.is_main:
        atomic_write_json(stage.path / "report.json", report)
        outputs = ["labels.h5", "report.json"] + (["export/list.txt"] if settings.export_png else [])
        stage.finish(outputs, summary(report))
        if not quiet:
            print_report(report, classes)
    return stage.path / "labels.h5"
