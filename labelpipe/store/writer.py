"""Write a prediction store from any segmentation network: bring your own predictions.

``labelpipe pseudolabel --predictions FILE.h5`` labels a store without a labelpipe model or run. This
module writes such a store, one image at a time, in the layout of :mod:`labelpipe.store.prediction_store`
(what ``labelpipe predict`` writes), either from the per-pixel columns you computed yourself or from the
network's full output, which it reduces to the columns with the formulas ``predict`` uses
(:func:`labelpipe.store.columns.pixel_columns`; ALGORITHMS.md section 1)::

    from labelpipe.store import PredictionWriter

    with PredictionWriter("predictions.h5", classes=["road", "sidewalk", ...]) as writer:
        for image_id, probs in my_network_outputs():      # probs: (C, H, W) softmax probabilities
            writer.add_probabilities(image_id, probs)     # -> label, conf, entropy
        # or writer.add_logits(image_id, logits, logits_aux) -> + variance (KL between the two heads)
        # or writer.add(image_id, label=label, conf=conf)  # (H, W) uint8 / float16 columns you computed

The file appears at ``path`` only when :meth:`close` (or the ``with`` block) completes; an exception
inside the block leaves no half-written store. Memory per image: the columns plus a band of about a
million pixels of the (C, H, W) input at a time (torch is imported only by the ``add_probabilities`` /
``add_logits`` reductions).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from labelpipe.errors import LabelpipeError
from labelpipe.pseudo.histogram import Float16Histogram
from labelpipe.store.atomic import temp_sibling
from labelpipe.store.prediction_store import (
    COLUMN_DTYPES,
    LIBVER,
    compression_options,
    count_columns,
    write_histograms,
    write_image,
    write_index,
)

PIXEL_COLUMNS = ("label", "conf", "entropy", "variance")
BAND_PIXELS = 1 << 20  # pixels of a (C, H, W) map reduced at a time: ~C x 4 MB of float32 temporaries


class PredictionWriter:
    """A prediction store written image by image (see the module docstring).

    path: the ``.h5`` file to create (replaced atomically on :meth:`close`). classes: the class names,
    or their number C (names ``class0`` ...). compression: ``"none"`` (default), ``"lzf"`` or
    ``"gzip-N"``: ``pseudolabel`` reads the label and conf columns (twice without the stored histograms),
    and an lzf column reads ~6x slower than a plain one (~80 vs ~500 MB/s on one core) for ~25% less
    disk on float16 confidences. Every image must bring the same columns: ``label`` and any
    of ``conf``, ``entropy``, ``variance`` (which ``labelpipe pseudolabel`` methods need: threshold,
    cbst and dars read conf; entropy reads entropy; variance reads variance). ``temperature`` is applied
    by :meth:`add_logits` and recorded in the file; ``attrs`` are extra file attributes (JSON-able).
    ``histograms``: also store, per float column, the per-class histogram of its float16 values that
    ``pseudolabel``'s first pass would compute (a few MB at most, sparse), so that labelling the store
    reads it once instead of twice (thresholds from the stored histogram; identical labels).
    """

    def __init__(
        self,
        path: str | Path,
        classes: list[str] | int,
        compression: str = "none",
        temperature: float = 1.0,
        attrs: dict[str, Any] | None = None,
        histograms: bool = True,
    ) -> None:
        if isinstance(classes, int):
            if classes < 1:
                raise LabelpipeError(f"classes: expected a positive number of classes, got {classes}")
            classes = [f"class{c}" for c in range(classes)]
        self.classes = [str(c) for c in classes]
        if not self.classes:
            raise LabelpipeError("classes: the list of class names is empty")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise LabelpipeError(f"temperature must be a positive number, got {temperature}")
        compression_options(compression, np.float16)  # a bad name fails here, before any file is made
        self.path = Path(path)
        self.compression = compression
        self.temperature = float(temperature)
        self.attrs = dict(attrs or {})
        self.columns: tuple[str, ...] | None = None
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._shapes: list[tuple[int, int]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_sibling(self.path)
        self._file: h5py.File | None = h5py.File(self._tmp, "w", libver=LIBVER)
        self._group = self._file.create_group("images")
        # Pass 1's histograms, counted while the columns are in memory (up to 256 classes: C x 254 kB each).
        self._histograms: dict[str, Float16Histogram] | None = {} if histograms and len(self.classes) <= 256 else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ----------------------------------------------------------------------------------------- adding
    def add(self, image_id: str, **columns: np.ndarray) -> None:
        """One image from its columns: ``label`` (H, W) integer class ids < C, and ``conf`` / ``entropy`` /
        ``variance`` (H, W) floats (stored as float16). conf must lie in [0, 1]; entropy and variance >= 0."""
        if self._file is None:
            raise LabelpipeError(f"{self.path}: the writer is closed")
        image_id = str(image_id)
        if not image_id:
            raise LabelpipeError("image id: empty")
        if image_id in self._seen:
            raise LabelpipeError(f"image id {image_id!r} added twice")
        unknown = sorted(set(columns) - set(PIXEL_COLUMNS))
        if unknown:
            raise LabelpipeError(f"{image_id}: unknown column(s) {', '.join(unknown)}; use {', '.join(PIXEL_COLUMNS)}")
        if "label" not in columns:
            raise LabelpipeError(f"{image_id}: the label column (argmax class per pixel) is required")
        names = tuple(c for c in PIXEL_COLUMNS if c in columns)
        if self.columns is None:
            self.columns = names
        elif names != self.columns:
            raise LabelpipeError(
                f"{image_id}: columns {', '.join(names)} differ from the first image's {', '.join(self.columns)}"
            )
        arrays = {name: self._checked(image_id, name, np.asarray(columns[name])) for name in names}
        shape = arrays["label"].shape
        for name, array in arrays.items():
            if array.shape != shape:
                raise LabelpipeError(f"{image_id}: {name} has shape {array.shape}, label has {shape}")
        write_image(self._group, image_id, arrays, self.compression)
        if self._histograms is not None:
            count_columns(self._histograms, arrays, self.num_classes)
        self._ids.append(image_id)
        self._seen.add(image_id)
        self._shapes.append(shape)

    def add_probabilities(self, image_id: str, probs: Any, probs_aux: Any | None = None) -> None:
        """One image from its (C, H, W) class probabilities (numpy or torch, any float dtype; renormalised
        to sum 1 per pixel), and optionally an auxiliary head's, for the variance column. Writes label,
        conf and entropy (+ variance) as ``predict`` computes them."""
        self._add_reduced(image_id, probs, probs_aux, from_probabilities=True)

    def add_logits(self, image_id: str, logits: Any, logits_aux: Any | None = None) -> None:
        """One image from its (C, H, W) logits, ``p = softmax(logits / temperature)``, and optionally an
        auxiliary head's logits, for the variance column: exactly ``predict``'s columns."""
        self._add_reduced(image_id, logits, logits_aux, from_probabilities=False)

    def _add_reduced(self, image_id: str, main: Any, aux: Any | None, from_probabilities: bool) -> None:
        import torch

        from labelpipe.store.columns import columns_to_numpy, pixel_columns

        what = "probabilities" if from_probabilities else "logits"
        main_t = self._map_tensor(image_id, main, what)
        aux_t = None if aux is None else self._map_tensor(image_id, aux, f"auxiliary {what}")
        if aux_t is not None and aux_t.shape != main_t.shape:
            raise LabelpipeError(f"{image_id}: auxiliary {what} {tuple(aux_t.shape)} != {tuple(main_t.shape)}")
        _, height, width = main_t.shape
        rows = max(1, BAND_PIXELS // max(width, 1))
        bands: list[dict[str, np.ndarray]] = []
        for start in range(0, height, rows):
            band = [t[:, start : start + rows] for t in (main_t, aux_t) if t is not None]
            if from_probabilities:
                # softmax(log p) = p / sum p; the floor keeps log finite where a probability is 0
                tiny = torch.finfo(torch.float32).tiny
                band = [t.float().clamp_min(tiny).log() for t in band]
            temperature = 1.0 if from_probabilities else self.temperature
            columns = pixel_columns(band[0], band[1] if len(band) > 1 else None, temperature)
            bands.append(columns_to_numpy(columns))
        self.add(image_id, **{name: np.concatenate([b[name] for b in bands]) for name in bands[0]})

    def _map_tensor(self, image_id: str, values: Any, what: str):
        import torch

        if not isinstance(values, torch.Tensor):
            array = np.asarray(values)
            values = torch.from_numpy(array if array.flags.writeable else array.copy())  # torch wants writable
        t = values
        if t.dim() != 3 or t.shape[0] != self.num_classes:
            raise LabelpipeError(f"{image_id}: {what} must be (C={self.num_classes}, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise LabelpipeError(f"{image_id}: {what} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise LabelpipeError(f"{image_id}: {what} hold NaN or infinite values")
        if what.endswith("probabilities") and bool((t < 0).any()):
            raise LabelpipeError(f"{image_id}: {what} hold negative values")
        return t.detach().cpu()

    def _checked(self, image_id: str, name: str, array: np.ndarray) -> np.ndarray:
        if array.ndim != 2:
            raise LabelpipeError(f"{image_id}: {name} must be a 2-D (H, W) map, got shape {array.shape}")
        if name == "label":
            if array.dtype.kind not in "ui":
                raise LabelpipeError(f"{image_id}: label must hold integer class ids, got dtype {array.dtype}")
            if array.size and (int(array.min()) < 0 or int(array.max()) >= self.num_classes):
                raise LabelpipeError(f"{image_id}: label holds class ids outside [0, {self.num_classes})")
            return array.astype(np.uint8 if self.num_classes <= 256 else np.uint16, copy=False)
        if array.dtype.kind != "f":
            raise LabelpipeError(f"{image_id}: {name} must be floating point, got dtype {array.dtype}")
        values = array.astype(COLUMN_DTYPES[name], copy=False)
        if array.size:
            low, high = float(values.min()), float(values.max())
            if math.isnan(low) or math.isnan(high):
                raise LabelpipeError(f"{image_id}: {name} holds NaN")
            if low < 0 or (name == "conf" and high > 1):
                bounds = "[0, 1]" if name == "conf" else ">= 0"
                raise LabelpipeError(f"{image_id}: {name} must lie in {bounds}, got [{low:g}, {high:g}]")
        return values

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> Path:
        """Write the index and attributes and move the file into place; returns its path."""
        if self._file is None:
            return self.path
        if not self._ids:
            self.abort()
            raise LabelpipeError(f"{self.path}: no image was added; nothing written")
        try:
            write_index(self._file, self._ids, self._shapes)
            if self._histograms:
                write_histograms(self._file, {name: h.counts for name, h in self._histograms.items()})
            attrs = {
                **self.attrs,
                "classes": self.classes,
                "num_classes": self.num_classes,
                "columns": list(self.columns or ()),
                "temperature": self.temperature,
                "source": self.attrs.get("source", "labelpipe.store.PredictionWriter"),
            }
            for key, value in attrs.items():
                self._file.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop what was written (no file appears at ``path``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
