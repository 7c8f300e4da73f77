"""matplotlib (Agg) figures for reports: written atomically, never shown.

matplotlib is imported on the first figure, not with this module: ``colorize`` (used by ``segment``)
and the commands that draw nothing start without paying for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labelpipe.store.atomic import atomic_path

if TYPE_CHECKING:
    import matplotlib.pyplot


class _LazyPyplot:
    """``matplotlib.pyplot`` with the Agg backend, imported on first attribute access."""

    _module: Any = None

    def __getattr__(self, name: str) -> Any:
        if _LazyPyplot._module is None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot

            _LazyPyplot._module = matplotlib.pyplot
        return getattr(_LazyPyplot._module, name)


plt: matplotlib.pyplot = _LazyPyplot()  # type: ignore[assignment]


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ignored pixels white."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = (255, 255, 255)
    return lut[mask]


def save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def per_class_bars(values: dict[str, float | None], path: Path, title: str, ylabel: str = "IoU") -> Path:
    names = list(values)
    heights = [v if v is not None else 0.0 for v in values.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 3.5))
    ax.bar(range(len(names)), heights, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def confusion(conf: np.ndarray, names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix (rows: ground truth)."""
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 2, 0.45 * len(names) + 1.5))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, path)


def image_grid(
    rows: list[list[np.ndarray]], titles: list[str], path: Path, row_labels: list[str] | None = None
) -> Path:
    """A grid of RGB images: one row per sample, one column per title."""
    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols, 1.8 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=7)
    return save(fig, path)


def reliability(bin_conf: list[float], bin_acc: list[float], bin_count: list[int], path: Path, title: str) -> Path:
    n = len(bin_conf)
    centers = (np.arange(n) + 0.5) / n
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    has = np.asarray(bin_count) > 0
    ax.bar(centers[has], np.asarray(bin_acc)[has], width=1 / n, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save(fig, path)


def class_distributions(dists: dict[str, np.ndarray], names: list[str], path: Path, title: str) -> Path:
    """Side-by-side bars of class distributions (DARS Figure 1: prior vs pseudo-labels vs truth)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    width = 0.8 / len(dists)
    x = np.arange(len(names))
    for i, (label, d) in enumerate(dists.items()):
        ax.bar(x + i * width - 0.4 + width / 2, d, width=width, label=label)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("fraction of pixels")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save(fig, path)


def training_curves(records: list[dict], path: Path, rounds: list[dict] | None = None, title: str = "") -> Path:
    """The curves of one training stage from its ``log.jsonl`` records (ALGORITHMS-agnostic).

    Panels against the optimizer step: every loss term (keys ``loss``/``loss_*``, log scale when
    positive), the learning rate, images/s, and the validation numbers (``val_miou`` and the other
    ``val_*`` rates in [0, 1]). With ``rounds`` (self-training: one dict per round with ``round`` and
    optional ``kept_fraction`` / ``precision`` / ``pseudo_miou``), a last panel shows them per round.
    """
    train = [r for r in records if "loss" in r]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    loss_keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss_")}, key=lambda k: k != "loss")
    val_keys = sorted({k for r in val for k in r if k.startswith("val_")}, key=lambda k: k != "val_miou")
    panels = ["loss", "lr", "images/s", "validation"] + (["pseudo-labels per round"] if rounds else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    ax_loss, ax_lr, ax_speed, ax_val = axes[0][:4]
    steps = [r["step"] for r in train]
    for key in loss_keys:
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            ax_loss.plot(*zip(*points, strict=True), label=key, lw=1.2 if key == "loss" else 0.9)
    if loss_keys and all(r.get(k, 1) > 0 for r in train for k in loss_keys if isinstance(r.get(k), (int, float))):
        ax_loss.set_yscale("log")
    if ax_loss.lines:  # none before the first logged step (a stage killed early, a run of a few steps)
        ax_loss.legend(fontsize=6)
    ax_lr.plot(steps, [r.get("lr", np.nan) for r in train], color="tab:green")
    ax_speed.plot(steps, [r.get("images_per_s", np.nan) for r in train], color="tab:purple")
    for key in val_keys:
        points = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if points:
            ax_val.plot(*zip(*points, strict=True), marker="o", ms=3, label=key.removeprefix("val_"))
    ax_val.set_ylim(0, 1)
    if val_keys:
        ax_val.legend(fontsize=6)
    for ax, name in zip(axes[0], panels, strict=False):
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if name != "pseudo-labels per round":
            ax.set_xlabel("step", fontsize=8)
    if rounds:
        ax = axes[0][4]
        numbers = [r["round"] for r in rounds]
        for key, label in (("kept_fraction", "kept fraction"), ("precision", "precision"), ("pseudo_miou", "mIoU")):
            values = [r.get(key) for r in rounds]
            if any(v is not None for v in values):
                ax.plot(numbers, [np.nan if v is None else v for v in values], marker="o", label=label)
        ax.set_xticks(numbers)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)
