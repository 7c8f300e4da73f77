"""The HDF5 prediction store: per-pixel columns of ALGORITHMS.md section 1, keyed by image id.

Layout of ``predictions.h5``::

    attrs   classes (JSON), num_classes, columns (JSON), temperature, model_sha256, labelpipe_version, ...
    index/  ids (str), height, width       # store order = the split's order
    images/<escaped id>/  label uint8 (H, W), conf / entropy / variance float16 (H, W),
                          [topk_prob float16 (k, H, W), topk_class uint8 (k, H, W)]

Writing is crash-safe: images go to numbered part files, each written under a temporary name and
renamed when complete (:class:`PartWriter`); :func:`merge_parts` joins the parts (of one or many
ranks) into the store with HDF5 object copies, so a killed ``predict`` resumes after the last
complete part and ends with the same store as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from labelpipe.errors import LabelpipeError
from labelpipe.store.atomic import reserve_space, temp_sibling, write_bytes

DEFAULT_COLUMNS = ("label", "conf", "entropy", "variance")
COLUMN_DTYPES = {
    "label": np.uint8,
    "conf": np.float16,
    "entropy": np.float16,
    "variance": np.float16,
    "topk_prob": np.float16,
    "topk_class": np.uint8,
    "weight": np.float16,
}


def escape_id(image_id: str) -> str:
    """HDF5 names may not contain '/'; ids like Cityscapes' ``city/stem`` do."""
    return image_id.replace("%", "%25").replace("/", "%2F")


# HDF5 >= 1.10 file format: its chunk indexes and compact groups cost ~100 bytes an image instead of the
# ~9 KB of the 1.8 B-trees (a 32 x 32 DigitScapes store: 16 -> 4 bytes a pixel). Readable by HDF5 1.10+.
LIBVER = ("v110", "latest")


def chunk_shape(shape: tuple[int, ...], compression: str = "lzf") -> tuple[int, ...] | None:
    """The HDF5 chunk shape of an image dataset: at most 256 along each axis when it is compressed (a
    filter needs chunks); None (contiguous) when it is not, so that an image, or a band of its rows, is
    one contiguous read (~30 % faster to read a 256 x 512 map than in 256 x 256 chunks)."""
    if compression == "none":
        return None
    return tuple(min(s, 256) for s in shape)


def compression_options(compression: str, dtype: np.dtype) -> dict[str, Any]:
    """``"lzf"``, ``"gzip-N"`` (N = 1..9) or ``"none"`` -> h5py ``create_dataset`` keywords.

    Multi-byte columns (float16) get the byte-shuffle filter: it groups the sign/exponent bytes,
    which are nearly constant, and makes them compress (lzf: -20% on a DigitScapes store).
    """
    if compression == "none":
        return {}
    if compression == "lzf":
        options: dict[str, Any] = {"compression": "lzf"}
    elif compression.startswith("gzip-") and compression[5:] in tuple("123456789"):
        options = {"compression": "gzip", "compression_opts": int(compression[5:])}
    else:
        raise LabelpipeError(f"compression {compression!r}: expected lzf, gzip-1 ... gzip-9 or none")
    return {**options, "shuffle": np.dtype(dtype).itemsize > 1}


def write_image(group: h5py.Group, image_id: str, columns: dict[str, np.ndarray], compression: str = "lzf") -> None:
    g = group.create_group(escape_id(image_id))
    for name, array in columns.items():
        dtype = COLUMN_DTYPES.get(name, array.dtype)
        if name in ("label", "topk_class") and array.max(initial=0) > 255:
            dtype = np.uint16  # C > 255
        g.create_dataset(
            name,
            data=array.astype(dtype, copy=False),
            chunks=chunk_shape(array.shape, compression),
            **compression_options(compression, dtype),
        )


class PartWriter:
    """Writes images to ``parts_dir/part-<rank>-<n>.h5`` in a background thread.

    A part holds ``images_per_part`` consecutive images of this rank's list and becomes visible
    (renamed into place) only once complete; ``done_ids()`` lists what earlier attempts finished.
    """

    def __init__(
        self,
        parts_dir: Path,
        rank: int = 0,
        images_per_part: int = 64,
        compression: str = "lzf",
        num_classes: int | None = None,
    ) -> None:
        compression_options(compression, np.float16)  # fail here, not in the writer thread
        self.dir, self.rank, self.per_part, self.compression = parts_dir, rank, images_per_part, compression
        self.num_classes = num_classes  # given: each part also holds its pass-1 histograms (merged by merge_parts)
        self.dir.mkdir(parents=True, exist_ok=True)
        import queue  # only predict's writer needs it: not imported on the pseudolabel path

        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.buffer: list[tuple[str, dict[str, np.ndarray]]] = []
        # After the last part on disk, never len(parts): a resume after a partial clean-up would
        # overwrite a complete part with other images and lose them.
        self.next_part = max((int(p.stem.rsplit("-", 1)[1]) for p in self.parts()), default=-1) + 1
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"part-{self.rank:03d}-*.h5"))

    def done_ids(self) -> list[str]:
        ids: list[str] = []
        for part in self.parts():
            with h5py.File(part, "r") as fh:
                ids.extend(s.decode() if isinstance(s, bytes) else s for s in fh["index/ids"][()])
        return ids

    def add(self, image_id: str, columns: dict[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        self.buffer.append((image_id, columns))
        if len(self.buffer) >= self.per_part:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.queue.put((self.next_part, self.buffer))
            self.next_part += 1
            self.buffer = []

    def close(self, complete: bool = True) -> None:
        """Write what is buffered (``complete``; not after an error or an interrupt: only whole parts are
        kept) and wait for the writer thread; re-raises its error."""
        if complete and self.error is None:
            self.flush()
        self.buffer = []
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            number, images = item
            path = self.dir / f"part-{self.rank:03d}-{number:06d}.h5"
            tmp = temp_sibling(path)
            try:
                # The part is built in memory and written with plain file I/O: HDF5 cannot fail cleanly on a
                # full disk (h5py segfaults while it cleans up), a Python write raises one OSError (ENOSPC).
                data = _part_image(tmp, images, self.compression, self.num_classes)
                write_bytes(tmp, data)
                os.replace(tmp, path)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the producer
                self.error = exc.with_traceback(None)  # keeps no frame (and no HDF5 object) alive
                tmp.unlink(missing_ok=True)


def _part_image(
    name: Path, images: list[tuple[str, dict[str, np.ndarray]]], compression: str, num_classes: int | None = None
) -> bytes:
    """A part file's bytes, built with HDF5's in-memory driver (nothing touches the disk); with
    ``num_classes``, also the part's pass-1 histograms of its float columns."""
    with h5py.File(name, "w", driver="core", backing_store=False, libver=LIBVER) as fh:
        grp = fh.create_group("images")
        for image_id, columns in images:
            write_image(grp, image_id, columns, compression)
        write_index(fh, [i for i, _ in images], [c["label"].shape for _, c in images])
        if num_classes is not None and num_classes <= 256 and images:
            write_histograms(fh, column_histograms(images, num_classes))
        fh.flush()
        return fh.id.get_file_image()


def write_index(fh: h5py.File, ids: list[str], shapes: list[tuple[int, ...]]) -> None:
    """The store's ``index`` group: the image ids in store order and each image's (height, width)."""
    idx = fh.require_group("index")
    idx.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
    idx.create_dataset("height", data=np.array([s[-2] for s in shapes], np.int32))
    idx.create_dataset("width", data=np.array([s[-1] for s in shapes], np.int32))


# Pass-1 histograms a writer may store beside the columns (``hist/<column>``): per predicted class, the
# count of every non-negative float16 bit pattern of the column (labelpipe.pseudo.histogram's layout),
# kept sparse (the flat indices ``class * bins + bits`` of the non-zero counts, and the counts). A reader
# uses one only when its total equals the store's pixel count.
HISTOGRAM_GROUP = "hist"


def write_histograms(fh: h5py.File, counts: dict[str, np.ndarray]) -> None:
    """``hist/<column>`` for each ``counts[column]``: a (classes, bins) int64 array of counts."""
    group = fh.require_group(HISTOGRAM_GROUP)
    for column, table in counts.items():
        flat = np.ascontiguousarray(table, dtype=np.int64).reshape(-1)
        index = np.flatnonzero(flat)
        sub = group.create_group(column)
        sub.attrs["rows"], sub.attrs["bins"] = table.shape
        sub.create_dataset("index", data=index.astype(np.int64))
        sub.create_dataset("count", data=flat[index])


def column_histograms(images: list[tuple[str, dict[str, np.ndarray]]], num_classes: int) -> dict[str, np.ndarray]:
    """(classes, bins) counts of every float16 pixel column of ``images`` (their ``label`` the class), as
    ``pseudolabel``'s pass 1 counts them (``labelpipe.pseudo.histogram``)."""
    hists: dict[str, Any] = {}
    for _, columns in images:
        count_columns(hists, columns, num_classes)
    return {column: h.counts for column, h in hists.items()}


def count_columns(hists: dict[str, Any], columns: dict[str, np.ndarray], num_classes: int) -> None:
    """Add one image's float16 pixel columns to ``hists`` (column -> ``Float16Histogram``, made on first use)."""
    from labelpipe.pseudo.histogram import Float16Histogram

    for column, values in columns.items():
        if column != "label" and values.dtype == np.float16 and values.shape == columns["label"].shape:
            if column not in hists:
                hists[column] = Float16Histogram(num_classes)
            hists[column].update(columns["label"], values)


def read_histogram(fh: h5py.File, column: str, rows: int, bins: int, pixels: int) -> np.ndarray | None:
    """The stored (rows, bins) counts of ``column``, or None when the store has none of that layout or
    they do not add up to the store's ``pixels``."""
    group = fh.get(f"{HISTOGRAM_GROUP}/{column}")
    if group is None or (int(group.attrs.get("rows", -1)), int(group.attrs.get("bins", -1))) != (rows, bins):
        return None
    index, count = group["index"][()], group["count"][()]
    if index.shape != count.shape or (index.size and (index.min() < 0 or index.max() >= rows * bins)):
        return None
    if int(count.sum()) != pixels or (count.size and count.min() < 0):
        return None
    table = np.zeros(rows * bins, np.int64)
    table[index] = count
    return table.reshape(rows, bins)


def merge_parts(part_files: list[Path], out: Path, order: list[str], attrs: dict[str, Any]) -> None:
    """Join part files into one store at ``out`` (atomically), images in ``order``."""
    tmp = temp_sibling(out)
    where: dict[str, Path] = {}
    for part in part_files:
        with h5py.File(part, "r") as fh:
            for s in fh["index/ids"][()]:
                where[s.decode() if isinstance(s, bytes) else s] = part
    missing = [i for i in order if i not in where]
    if missing:
        where_parts = part_files[0].parent if part_files else out.parent
        raise LabelpipeError(
            f"{where_parts}: parts lack {len(missing)} images (e.g. {missing[0]}); rerun predict to finish them"
        )
    # HDF5 cannot fail cleanly on a full disk: make sure the store fits before writing it (the parts'
    # sizes plus 5 %: the store holds the same compressed chunks).
    reserve_space(out.parent, int(sum(p.stat().st_size for p in part_files) * 1.05) + (1 << 20), out)
    handles = {p: h5py.File(p, "r") for p in part_files}
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as dst:
            grp = dst.create_group("images")
            shapes = []
            for image_id in order:
                src = handles[where[image_id]]["images"][escape_id(image_id)]
                src.file.copy(src, grp, name=escape_id(image_id))
                shapes.append(src["label"].shape)
            write_index(dst, order, shapes)
            summed = _summed_part_histograms(list(handles.values()))
            if summed:
                write_histograms(dst, summed)
            for key, value in attrs.items():
                dst.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        os.replace(tmp, out)
    finally:
        for h in handles.values():
            h.close()
        tmp.unlink(missing_ok=True)


def _summed_part_histograms(parts: list[h5py.File]) -> dict[str, np.ndarray]:
    """The parts' histograms summed, for the columns every part has one of in the same layout (a reader
    still checks the sum against the merged store's pixels: a part's images left out do not count)."""
    columns = None
    for fh in parts:
        group = fh.get(HISTOGRAM_GROUP)
        names = set(group) if group is not None else set()
        columns = names if columns is None else columns & names
    summed: dict[str, np.ndarray] = {}
    for column in sorted(columns or ()):
        layouts = {
            (int(fh[HISTOGRAM_GROUP][column].attrs["rows"]), int(fh[HISTOGRAM_GROUP][column].attrs["bins"]))
            for fh in parts
        }
        if len(layouts) != 1:
            continue
        rows, bins = layouts.pop()
        table = np.zeros(rows * bins, np.int64)
        for fh in parts:
            group = fh[HISTOGRAM_GROUP][column]
            np.add.at(table, group["index"][()], group["count"][()])
        summed[column] = table.reshape(rows, bins)
    return summed


class PredictionStore:
    """Read access to a prediction (or label) store, usable without the CLI.

    ``store.ids``; ``store[id]`` -> dict of arrays; ``store.attrs``; ``store.iter_chunks()``.
    """

    def __init__(self, path: Path, num_classes: int | None = None, require: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LabelpipeError(f"{self.path}: prediction store not found; run `labelpipe predict` first")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise LabelpipeError(f"{self.path}: not a readable HDF5 store ({exc}); rerun predict with --force") from exc
        self.attrs = {k: _decode_attr(v) for k, v in self.file.attrs.items()}
        self.ids = [s.decode() if isinstance(s, bytes) else s for s in self.file["index/ids"][()]]
        self.columns = list(self.attrs.get("columns", []))
        if num_classes is not None and self.attrs.get("num_classes") != num_classes:
            raise LabelpipeError(
                f"{self.path}: store has {self.attrs.get('num_classes')} classes "
                f"but the data set has {num_classes}; "
                "predict again with this data set's model"
            )
        missing = [c for c in require if c not in self.columns]
        if missing:
            raise LabelpipeError(
                f"{self.path}: store lacks column(s) {', '.join(missing)}; "
                f"rerun predict (it writes {', '.join(DEFAULT_COLUMNS)})"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        return self.read(image_id)

    def read(self, image_id: str, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The arrays of one image: every column, or only ``columns`` (the others are not read)."""
        grp = self.file["images"][escape_id(image_id)]
        return {name: grp[name][()] for name in (grp if columns is None else columns)}

    def stored_histogram(self, column: str, rows: int, bins: int) -> np.ndarray | None:
        """The writer's (rows, bins) pass-1 histogram of ``column`` (see :func:`write_histograms`), or None
        when the store carries none that matches its pixels."""
        pixels = sum(h * w for h, w in self.shapes())
        return read_histogram(self.file, column, rows, bins, pixels)

    def shapes(self) -> list[tuple[int, int]]:
        return list(zip(self.file["index/height"][()].tolist(), self.file["index/width"][()].tolist(), strict=True))

    def iter_chunks(
        self,
        columns: tuple[str, ...] | None = None,
        images_per_chunk: int | None = None,
        max_pixels: int | None = None,
        images: range | None = None,
        reuse_buffers: bool = False,
    ) -> Iterator[dict]:
        """Yields ``{"ids": [...], "shapes": [...], "pieces": [...], column: flat concatenated array, ...}``.

        ``max_pixels`` bounds a chunk in pixels (memory flat in both the number and the size of the
        images): whole images are packed while they fit, and an image larger than the bound is split into
        bands of rows. Then ``pieces[i] = (image index, first row, end row)`` and ``shapes[i]`` is that
        band's (rows, width); ``ids[i]`` repeats the image's id for each of its bands. Without
        ``max_pixels``, ``images_per_chunk`` whole images (default 64) make a chunk. ``images`` limits the
        chunks to a range of image indices (a process's shard). Each listed column is read once, straight
        into the chunk's arrays (``read_direct``); with ``reuse_buffers`` those arrays are reused by the
        next chunk, so a caller must be done with a chunk before asking for the next one.
        """
        columns = columns or tuple(c for c in self.columns if not c.startswith("topk"))
        if len(set(columns)) != len(columns):
            raise ValueError(f"columns listed twice: {columns}")
        shapes = self.shapes()
        images = images if images is not None else range(len(self.ids))
        plan = _chunk_plan(shapes, images, images_per_chunk, max_pixels)
        buffers: dict[str, np.ndarray] = {}
        dtypes = self._column_dtypes(columns, images)
        for pieces in plan:
            sizes = [(end - start) * shapes[i][1] for i, start, end in pieces]
            total = sum(sizes)
            chunk: dict[str, Any] = {
                "ids": [self.ids[i] for i, _, _ in pieces],
                "shapes": [(end - start, shapes[i][1]) for i, start, end in pieces],
                "pieces": pieces,
            }
            outs = {}
            for c in columns:
                dtype = dtypes[c]
                if reuse_buffers:
                    if c not in buffers or buffers[c].size < total or buffers[c].dtype != dtype:
                        buffers[c] = np.empty(max(total, _largest_chunk(plan, shapes)), dtype)
                    outs[c] = buffers[c][:total]
                else:
                    outs[c] = np.empty(total, dtype)
            offset = 0
            for (i, start, end), size in zip(pieces, sizes, strict=True):
                path = f"images/{escape_id(self.ids[i])}/".encode()
                for c, out in outs.items():
                    dest = out[offset : offset + size].reshape(end - start, shapes[i][1])
                    self._read_rows(path + c.encode(), start, end, shapes[i][0], dest)
                offset += size
            chunk.update(outs)
            yield chunk

    def _column_dtypes(self, columns: tuple[str, ...], images: range) -> dict[str, np.dtype]:
        """The dtype each column is read in: the first image's, except that class columns are read as uint16
        when the store has more than 256 classes (an image whose ids all fit a byte may be stored as uint8:
        HDF5 widens it while reading)."""
        if not images:
            return {c: np.dtype(COLUMN_DTYPES.get(c, np.float16)) for c in columns}
        first = self.file["images"][escape_id(self.ids[images[0]])]
        wide = int(self.attrs.get("num_classes") or 0) > 256
        return {c: np.dtype(np.uint16) if wide and c in ("label", "topk_class") else first[c].dtype for c in columns}

    def _read_rows(self, path: bytes, start: int, end: int, height: int, dest: np.ndarray) -> None:
        """Rows ``start:end`` of the 2-D dataset at ``path`` (``height`` rows) into ``dest`` ((end - start,
        W), C-contiguous), converted to ``dest``'s dtype by HDF5 where the image is stored in another.

        HDF5's own calls (``h5d.open``, a hyperslab for a band, ``read``): h5py's high-level group and
        dataset lookups and selections cost ~0.25 ms a column, which is most of the time of reading a 256 x
        512 map (~0.1 s of the 0.13 s of two columns of 100 maps; ~0.02 s this way)."""
        try:
            dataset = h5py.h5d.open(self.file.id, path)
        except KeyError as exc:
            raise LabelpipeError(f"{self.path}: no dataset {path.decode()}; the store is incomplete") from exc
        space = dataset.get_space()
        shape = space.shape
        if len(shape) != 2 or shape[0] != height or shape[1] != dest.shape[1]:
            raise LabelpipeError(f"{self.path}: {path.decode()} is not the {height} x {dest.shape[1]} map of its index")
        if (start, end) == (0, height):
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, dest)
            return
        space.select_hyperslab((start, 0), (end - start, shape[1]))
        dataset.read(h5py.h5s.create_simple(dest.shape), space, dest)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DEFAULT_IMAGES_PER_CHUNK = 64


def _chunk_plan(
    shapes: list[tuple[int, int]], images: range, images_per_chunk: int | None, max_pixels: int | None
) -> list[list[tuple[int, int, int]]]:
    """Chunks as lists of ``(image index, first row, end row)``: whole images ``images_per_chunk`` at a
    time, or packed up to ``max_pixels`` pixels with larger images cut into bands of whole rows."""
    if max_pixels is None:
        step = images_per_chunk or DEFAULT_IMAGES_PER_CHUNK
        if step < 1:
            raise ValueError(f"images_per_chunk must be >= 1, got {step}")
        return [[(i, 0, shapes[i][0]) for i in images[k : k + step]] for k in range(0, len(images), step)]
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    plan: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    used = 0
    for i in images:
        height, width = shapes[i]
        rows_per_band = max(1, max_pixels // max(width, 1))  # a row wider than the bound is one band
        for start in range(0, height, rows_per_band):
            end = min(height, start + rows_per_band)
            size = (end - start) * width
            if current and used + size > max_pixels:
                plan.append(current)
                current, used = [], 0
            current.append((i, start, end))
            used += size
    if current:
        plan.append(current)
    return plan


def _largest_chunk(plan: list[list[tuple[int, int, int]]], shapes: list[tuple[int, int]]) -> int:
    return max((sum((end - start) * shapes[i][1] for i, start, end in pieces) for pieces in plan), default=0)


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
