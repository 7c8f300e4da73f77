"""The prediction store: parts written by ranks merge into one store that reads back what was written."""

from __future__ import annotations

import numpy as np
import pytest

from labelpipe.errors import LabelpipeError
from labelpipe.store.prediction_store import PartWriter, PredictionStore, merge_parts

C = 7
SHAPES = {"city/a_000001": (5, 9), "city/b%2F": (3, 4), "plain": (8, 8), "x/y/z": (1, 1), "big": (300, 20)}


def image_columns(rng: np.random.Generator, shape: tuple[int, int], topk: int = 2) -> dict[str, np.ndarray]:
    prob = rng.dirichlet(np.ones(C), size=shape).transpose(2, 0, 1).astype(np.float32)  # (C, H, W)
    order = np.argsort(-prob, axis=0)
    return {
        "label": order[0].astype(np.uint8),
        "conf": prob.max(0).astype(np.float16),
        "entropy": (-(prob * np.log(prob)).sum(0)).astype(np.float16),
        "variance": rng.random(shape).astype(np.float16),
        "topk_prob": np.take_along_axis(prob, order[:topk], 0).astype(np.float16),
        "topk_class": order[:topk].astype(np.uint8),
    }


@pytest.fixture()
def written(tmp_path):
    """Images written by two ranks in small parts, and the arrays they were given."""
    rng = np.random.default_rng(0)
    arrays = {i: image_columns(rng, s) for i, s in SHAPES.items()}
    ids = list(SHAPES)
    for rank in (0, 1):
        writer = PartWriter(tmp_path / "parts", rank=rank, images_per_part=2)
        for image_id in ids[rank::2]:
            writer.add(image_id, arrays[image_id])
        writer.close()
    return tmp_path / "parts", arrays


def test_merged_store_reads_back_every_array_in_the_given_order(written, tmp_path):
    parts_dir, arrays = written
    order = ["x/y/z", "big", "plain", "city/a_000001", "city/b%2F"]  # not the order they were written in
    classes = [f"class-{c}" for c in range(C)]
    out = tmp_path / "predictions.h5"
    merge_parts(
        sorted(parts_dir.glob("part-*.h5")),
        out,
        order,
        {"classes": classes, "num_classes": C, "temperature": 1.5, "columns": list(arrays["plain"])},
    )
    with PredictionStore(out, num_classes=C, require=("label", "conf")) as store:
        assert store.ids == order
        assert len(store) == len(order)
        assert store.attrs["classes"] == classes
        assert store.attrs["temperature"] == 1.5 and store.attrs["num_classes"] == C
        assert store.shapes() == [SHAPES[i] for i in order]
        for image_id in order:
            got = store[image_id]
            assert got.keys() == arrays[image_id].keys()
            for name, expected in arrays[image_id].items():
                assert got[name].dtype == expected.dtype, (image_id, name)
                np.testing.assert_array_equal(got[name], expected, err_msg=f"{image_id} {name}")
        chunks = list(store.iter_chunks(images_per_chunk=2))
        assert [c["ids"] for c in chunks] == [order[:2], order[2:4], order[4:]]
        assert [s for c in chunks for s in c["shapes"]] == [SHAPES[i] for i in order]
        assert "topk_prob" not in chunks[0], "top-k columns are read only when asked for"
        for name in ("label", "conf", "entropy", "variance"):
            expected = np.concatenate([arrays[i][name].ravel() for i in order])
            np.testing.assert_array_equal(np.concatenate([c[name] for c in chunks]), expected, err_msg=name)


def test_parts_are_whole_and_listed_as_done(written):
    parts_dir, arrays = written
    assert [p.name for p in sorted(parts_dir.glob("*"))] == [
        "part-000-000000.h5",
        "part-000-000001.h5",
        "part-001-000000.h5",
    ]  # rank 0: 3 images in parts of 2 (the last one short), rank 1: 2 images
    ids = list(SHAPES)
    assert PartWriter(parts_dir, rank=0).done_ids() == ids[0::2]
    assert PartWriter(parts_dir, rank=1).done_ids() == ids[1::2]


def test_resumed_writer_never_overwrites_a_part(written):
    """After a partial clean-up (part 0 gone, 1 left) new images go to part 2, not over part 1."""
    parts_dir, arrays = written
    (parts_dir / "part-000-000000.h5").unlink()
    kept = PartWriter(parts_dir, rank=0).done_ids()
    writer = PartWriter(parts_dir, rank=0, images_per_part=2)
    writer.add("again", arrays["plain"])
    writer.close()
    assert (parts_dir / "part-000-000002.h5").is_file()
    assert PartWriter(parts_dir, rank=0).done_ids() == kept + ["again"]


@pytest.mark.parametrize("compression", ["lzf", "gzip-1", "none"])
def test_every_compression_reads_back_exactly(tmp_path, compression):
    arrays = image_columns(np.random.default_rng(1), (40, 50))
    writer = PartWriter(tmp_path / "parts", compression=compression)
    writer.add("one", arrays)
    writer.close()
    merge_parts(sorted((tmp_path / "parts").glob("part-*.h5")), tmp_path / "p.h5", ["one"], {"num_classes": C})
    with PredictionStore(tmp_path / "p.h5") as store:
        for name, expected in arrays.items():
            np.testing.assert_array_equal(store["one"][name], expected)


def test_unknown_compression_is_refused_before_writing(tmp_path):
    with pytest.raises(LabelpipeError, match="gzip-1"):
        PartWriter(tmp_path / "parts", compression="zstd")


def test_merge_refuses_parts_that_lack_images(written, tmp_path):
    parts_dir, _ = written
    with pytest.raises(LabelpipeError, match="lack 1 images .*missing"):
        merge_parts(sorted(parts_dir.glob("part-*.h5")), tmp_path / "p.h5", list(SHAPES) + ["missing"], {})
    assert not (tmp_path / "p.h5").exists()
    with pytest.raises(LabelpipeError, match="lack 1 images"):
        merge_parts([], tmp_path / "p.h5", ["missing"], {})


def test_store_errors_say_what_to_do(written, tmp_path):
    parts_dir, _ = written
    with pytest.raises(LabelpipeError, match="not found; run `labelpipe predict` first"):
        PredictionStore(tmp_path / "nothing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(LabelpipeError, match="not a readable HDF5 store"):
        PredictionStore(tmp_path / "junk.h5")
    out = tmp_path / "p.h5"
    merge_parts(
        sorted(parts_dir.glob("part-*.h5")),
        out,
        list(SHAPES),
        {"num_classes": C, "columns": ["label", "conf"]},
    )
    with pytest.raises(LabelpipeError, match="store has 7 classes but the data set has 19"):
        PredictionStore(out, num_classes=19)
    with pytest.raises(LabelpipeError, match="lacks column\\(s\\) entropy"):
        PredictionStore(out, num_classes=C, require=("label", "entropy"))


def test_parts_histograms_merge_into_the_stores_pass_1_histograms(tmp_path):
    from labelpipe.pseudo.histogram import NUM_BINS, Float16Histogram

    rng = np.random.default_rng(1)
    arrays = {i: image_columns(rng, s) for i, s in SHAPES.items()}
    ids = list(SHAPES)
    for rank in (0, 1):
        writer = PartWriter(tmp_path / "parts", rank=rank, images_per_part=2, num_classes=C)
        for image_id in ids[rank::2]:
            writer.add(image_id, arrays[image_id])
        writer.close()
    parts = sorted((tmp_path / "parts").glob("part-*.h5"))
    merge_parts(parts, tmp_path / "store.h5", ids, {"num_classes": C})
    with PredictionStore(tmp_path / "store.h5") as store:
        for column in ("conf", "entropy", "variance"):
            expected = Float16Histogram(C)
            for a in arrays.values():
                expected.update(a["label"], a[column])
            np.testing.assert_array_equal(store.stored_histogram(column, C, NUM_BINS), expected.counts)
        assert store.stored_histogram("topk_prob", C, NUM_BINS) is None  # (k, H, W): not a pixel column
    # A store merged without one of the images: the summed histograms no longer add up, and are not used.
    merge_parts(parts, tmp_path / "fewer.h5", ids[:-1], {"num_classes": C})
    with PredictionStore(tmp_path / "fewer.h5") as store:
        assert store.stored_histogram("conf", C, NUM_BINS) is None


@pytest.mark.parametrize(("compression", "chunked"), [("none", False), ("lzf", True)])
def test_a_plain_store_is_contiguous_and_a_compressed_one_chunked_and_both_read_back(tmp_path, compression, chunked):
    """Uncompressed images are stored contiguous (an image, or a band of its rows, is one read); compressed
    ones in chunks (a filter needs them). Both read back the same, whole or in bands of rows."""
    import h5py

    from labelpipe.store.writer import PredictionWriter

    rng = np.random.default_rng(3)
    arrays = {i: image_columns(rng, s) for i, s in SHAPES.items()}
    path = tmp_path / "store.h5"
    with PredictionWriter(path, C, compression=compression) as writer:
        for image_id, cols in arrays.items():
            writer.add(image_id, label=cols["label"], conf=cols["conf"])
    with h5py.File(path, "r") as fh:
        dataset = fh["images/big/conf"]
        assert (dataset.chunks is not None) == chunked
    with PredictionStore(path) as store:
        for max_pixels in (None, 7):  # whole images, then bands of a few rows
            chunks = list(store.iter_chunks(("label", "conf"), max_pixels=max_pixels))
            labels = np.concatenate([c["label"] for c in chunks])
            conf = np.concatenate([c["conf"] for c in chunks])
            np.testing.assert_array_equal(labels, np.concatenate([a["label"].ravel() for a in arrays.values()]))
            np.testing.assert_array_equal(conf, np.concatenate([a["conf"].ravel() for a in arrays.values()]))


def test_class_ids_beyond_a_byte_are_read_wide_even_where_an_image_fits_a_byte(tmp_path):
    """With more than 256 classes an image is stored uint8 when its ids fit and uint16 when not: a chunk
    reads both as uint16 (HDF5 widens the uint8 one), whichever image comes first."""
    from labelpipe.store.writer import PredictionWriter

    path = tmp_path / "wide.h5"
    small = np.arange(12, dtype=np.uint16).reshape(3, 4)  # ids < 256: stored as uint8
    large = (small + 280).astype(np.uint16)  # stored as uint16
    conf = np.full((3, 4), 0.5, np.float16)
    with PredictionWriter(path, 300) as writer:
        writer.add("small", label=small, conf=conf)
        writer.add("large", label=large, conf=conf)
    with PredictionStore(path) as store:
        (chunk,) = store.iter_chunks(("label",))
        assert chunk["label"].dtype == np.uint16
        np.testing.assert_array_equal(chunk["label"], np.concatenate([small.ravel(), large.ravel()]))


def test_an_image_whose_size_disagrees_with_the_index_is_a_one_line_error(tmp_path):
    import h5py

    from labelpipe.store.writer import PredictionWriter

    path = tmp_path / "store.h5"
    with PredictionWriter(path, C) as writer:
        writer.add("a", label=np.zeros((4, 5), np.uint8), conf=np.zeros((4, 5), np.float16))
    with h5py.File(path, "r+") as fh:
        del fh["images/a/conf"]
        fh["images/a"].create_dataset("conf", data=np.zeros((5, 4), np.float16))
    with PredictionStore(path) as store, pytest.raises(LabelpipeError, match="images/a/conf is not the 4 x 5 map"):
        list(store.iter_chunks(("label", "conf")))
