"""torch Datasets over :class:`~labelpipe.data.base.SampleRef` lists, and the step sampler.

Training is counted in steps, not epochs. :class:`StepBatchSampler` maps a global step to the
batch it trains on: sample position ``k = step * batch + j`` falls in epoch ``k // n``, whose
order is a permutation seeded by (seed, epoch). Each item carries its own augmentation seed.
A resumed run therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from labelpipe.data.base import DatasetSource, SampleRef
from labelpipe.data.transforms import to_model_input

MIX = 0x9E3779B1


def item_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch * MIX + position * 7919) % (2**63 - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start .. total-1``, a batch of ``(dataset_index, augmentation_seed)``.

    Under DDP each rank takes its ``rank::world`` share of every global batch. With ``index_map`` an epoch
    permutes those positions instead of ``range(n)`` (repeat-factor sampling: an image listed twice is seen
    twice an epoch); a batch holds ``index_map[position]``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int,
        total: int,
        rank: int = 0,
        world: int = 1,
        index_map: np.ndarray | None = None,
    ) -> None:
        if index_map is not None:
            index_map = np.asarray(index_map, dtype=np.int64)
            if index_map.size == 0 or index_map.min() < 0 or index_map.max() >= n:
                raise ValueError(f"index_map must list indices of the {n} items")
            n = index_map.size
        self.n, self.batch_size, self.seed, self.index_map = n, batch_size, seed, index_map
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, epoch, 0)))
            }
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.rank, self.batch_size, self.world):
            k = step * self.batch_size + j
            epoch, pos = divmod(k, self.n)
            index = int(self._perm(epoch)[pos])
            if self.index_map is not None:
                index = int(self.index_map[index])
            out.append((index, item_seed(self.seed, epoch, pos)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class DecodedCache:
    """Decoded images and masks kept in memory, up to ``max_bytes``, first come (nothing is evicted): a
    round reads each of its images many times (on DigitScapes' 1/16 split every labeled image ~250 times
    in a 4,000-step round), and decoding a PNG is ~6 % of a CPU step. Entries are read-only arrays, keyed by
    file paths; a read that fails is not kept. One cache per process (each DataLoader worker fills its own).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: dict[tuple, tuple[np.ndarray | None, ...]] = {}

    @classmethod
    def of_mib(cls, mib: int) -> DecodedCache | None:
        """A cache of ``mib`` MiB, None for 0 (every read decodes the file)."""
        return cls(mib * 2**20) if mib > 0 else None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, read: Callable[[], tuple[np.ndarray | None, ...]]) -> tuple[np.ndarray | None, ...]:
        """``key``'s arrays, from memory, or from ``read()`` (kept if they fit the budget)."""
        hit = self._items.get(key)
        if hit is not None:
            return hit
        value = read()
        size = sum(a.nbytes for a in value if a is not None)
        if self.used + size <= self.max_bytes:
            for a in value:
                if a is not None:
                    a.flags.writeable = False  # a caller that wrote into one would change every later read
            self._items[key] = value
            self.used += size
        return value


class SegmentationDataset(Dataset):
    """Image (normalised float32, 3 x H x W), mask (int64, H x W, 255 ignore) and id.

    ``transform`` is a ``transforms.v2`` pipeline over ``(tv_tensors.Image, tv_tensors.Mask)``;
    ``photometric`` (optional) is applied to the image only, after it. Items are keyed by an
    int (no augmentation) or ``(index, seed)`` (augmentation seeded per sample). With ``pad_mask`` an
    augmented item also has ``valid`` (bool, H x W): False on the crop's padding, which the mask
    cannot tell apart from ignored pixels (both 255). With ``weak_view`` it also has ``image_weak``: the
    same crop before ``photometric`` (what a mean teacher sees), from the same read of the image. With
    ``cache`` the decoded image (and its on-disk mask) is read from memory after its first read; masks from
    ``masks`` (pseudo-labels) are never cached.
    """

    def __init__(
        self,
        source: DatasetSource,
        samples: list[SampleRef],
        transform: Callable | None = None,
        photometric: Callable | None = None,
        require_masks: bool = True,
        masks: Callable[[int], np.ndarray | None] | None = None,
        weights: Callable[[int], np.ndarray] | None = None,
        pad_mask: bool = False,
        weak_view: bool = False,
        cache: DecodedCache | None = None,
    ) -> None:
        self.source, self.samples, self.cache = source, samples, cache
        self.pad_mask, self.weak_view = pad_mask, weak_view
        self.transform, self.photometric = transform, photometric
        self.require_masks = require_masks
        self.masks = masks  # overrides the on-disk masks (pseudo-labels)
        self.weights = weights  # optional per-pixel weights, transformed with the mask

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, key: tuple, read: Callable[[], tuple]) -> tuple:
        return read() if self.cache is None else self.cache.get(key, read)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        sample = self.samples[index]
        if self.masks is not None:  # pseudo-labels (or none): the disk's mask is not read
            image, mask = self._read((sample.image,), lambda: (self.source.read_image(sample),))[0], self.masks(index)
        else:
            image, mask = self._read((sample.image, sample.mask), lambda: self.source.read_pair(sample))
        if mask is None:
            if self.require_masks:
                from labelpipe.errors import LabelpipeError

                raise LabelpipeError(f"{sample.image}: no mask for this image; a labeled split needs masks")
            mask = np.full(image.shape[:2], 255, np.uint8)
        return (
            tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(np.array(mask))),
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = (key, None) if isinstance(key, int) else key
        image, mask = self.load(index)
        weight = inside = None
        weak = image
        if self.weights is not None:
            weight = tv_tensors.Mask(torch.from_numpy(np.asarray(self.weights(index), np.float32)))
        if seed is not None and (self.transform is not None or self.photometric is not None):
            with torch.random.fork_rng(devices=[]):
                # The CPU generator alone: the transforms draw from it, and torch.manual_seed would also
                # queue a seed for every lazy accelerator (with a captured traceback each, ~20 % of loading).
                torch.default_generator.manual_seed(seed)
                if self.transform is not None:
                    # Masks move together; padding fills every Mask with 255, so an all-zero mask
                    # comes out 255 exactly on the padding.
                    extra = [] if weight is None else [weight]
                    if self.pad_mask:
                        extra.append(tv_tensors.Mask(torch.zeros(mask.shape[-2:], dtype=torch.uint8)))
                    image, mask, *extra = self.transform(image, mask, *extra)
                    if self.pad_mask:
                        inside = extra.pop() == 0
                    if weight is not None:
                        weight = extra.pop()
                weak = image
                if self.photometric is not None:
                    image = self.photometric(image)
        item = {
            "image": to_model_input(image.as_subclass(torch.Tensor)),
            "mask": mask.as_subclass(torch.Tensor).long(),
            "index": index,
            "id": self.samples[index].id,
        }
        if self.weak_view:
            item["image_weak"] = to_model_input(weak.as_subclass(torch.Tensor)) if weak is not image else item["image"]
        if weight is not None:
            item["weight"] = weight.as_subclass(torch.Tensor).float()
        if self.pad_mask:
            item["valid"] = (
                inside.as_subclass(torch.Tensor)
                if inside is not None
                else torch.ones_like(item["mask"], dtype=torch.bool)
            )
        return item


def collate(items: list[dict]) -> dict:
    """Stack same-size items; keep lists where sizes differ (sliding-window eval handles those)."""
    out: dict = {"index": torch.tensor([it["index"] for it in items]), "id": [it["id"] for it in items]}
    for key in ("image", "image_weak", "mask", "weight", "valid"):
        if key not in items[0]:
            continue
        tensors = [it[key] for it in items]
        same = all(t.shape == tensors[0].shape for t in tensors)
        out[key] = torch.stack(tensors) if same else tensors
    return out
