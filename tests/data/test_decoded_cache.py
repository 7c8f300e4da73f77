"""The in-memory cache of decoded training images: the same items as reading the files, fewer reads, a budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch


class CountingSource:
    """A data source that counts its file reads (delegates everything else)."""

    def __init__(self, source) -> None:
        self.source, self.pairs, self.images = source, 0, 0

    def read_pair(self, sample):
        self.pairs += 1
        return self.source.read_pair(sample)

    def read_image(self, sample):
        self.images += 1
        return self.source.read_image(sample)


@pytest.fixture()
def source(tiny_root):
    from labelpipe.data import open_source

    return open_source(tiny_root)


def test_cached_items_equal_read_items_and_each_file_is_decoded_once(source):
    from labelpipe.data.dataset import DecodedCache, SegmentationDataset
    from labelpipe.data.transforms import strong_photometric, weak_transform

    samples = source.split("source_train")[:4]
    weak = weak_transform(32, (0.75, 1.25), True)
    plain = SegmentationDataset(source, samples, weak, photometric=strong_photometric(1.0))
    counting = CountingSource(source)
    cached = SegmentationDataset(
        counting, samples, weak, photometric=strong_photometric(1.0), cache=DecodedCache.of_mib(16)
    )
    for epoch in range(3):
        for i in range(len(samples)):
            key = (i, 1000 * epoch + i)
            a, b = plain[key], cached[key]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert counting.pairs == len(samples)  # 12 items, 4 decodes
    assert len(cached.cache) == len(samples)
    image, mask = cached.cache.get((samples[0].image, samples[0].mask), lambda: pytest.fail("not cached"))
    assert not image.flags.writeable and not mask.flags.writeable  # no caller can change a later read


def test_pseudo_label_masks_are_read_every_time_and_only_the_image_is_cached(source):
    from labelpipe.data.dataset import DecodedCache, SegmentationDataset

    samples = source.split("target_train")[:2]
    counting = CountingSource(source)
    calls = []

    def labels(index: int) -> np.ndarray:  # a round's labels: they change between rounds, never cached
        calls.append(index)
        return np.full((64, 64), len(calls) % 11, np.uint8)

    ds = SegmentationDataset(counting, samples, require_masks=False, masks=labels, cache=DecodedCache.of_mib(16))
    first, second = ds[0], ds[0]
    assert calls == [0, 0] and counting.images == 1 and counting.pairs == 0
    assert not torch.equal(first["mask"], second["mask"])  # the second read's labels, not the first's
    assert torch.equal(first["image"], second["image"])


def test_the_budget_bounds_what_is_kept_and_zero_turns_the_cache_off(source):
    from labelpipe.data.dataset import DecodedCache, SegmentationDataset

    samples = source.split("source_train")[:3]
    image, mask = source.read_pair(samples[0])
    one = image.nbytes + mask.nbytes
    assert DecodedCache.of_mib(0) is None
    cache = DecodedCache(max_bytes=one + one // 2)  # room for one image and its mask, not two
    counting = CountingSource(source)
    ds = SegmentationDataset(counting, samples, cache=cache)
    for _ in range(2):
        for i in range(len(samples)):
            ds[i]
    assert len(cache) == 1 and cache.used == one <= cache.max_bytes
    assert counting.pairs == 1 + 2 * 2  # the first kept; the two that did not fit are decoded each time


def test_a_failed_read_is_not_kept(source):
    from labelpipe.data.dataset import DecodedCache

    cache = DecodedCache.of_mib(1)

    def broken():
        raise OSError("truncated")

    with pytest.raises(OSError):
        cache.get(("x.png",), broken)
    assert len(cache) == 0 and cache.used == 0
    assert cache.get(("x.png",), lambda: (np.zeros(4, np.uint8),))[0].sum() == 0


def test_the_cache_budget_is_an_execution_setting():
    from labelpipe.config import TrainConfig

    assert "image_cache_mb" in TrainConfig.EXECUTION_ONLY  # a run stays up to date when only this changes
    assert "image_cache_mb" not in TrainConfig().fingerprint_fields()
    with pytest.raises(ValueError):
        TrainConfig(image_cache_mb=-1)
