"""Data sets: the generic folder layout, the embedded DigitScapes, and benchmark adapters."""

from __future__ import annotations

from pathlib import Path

from labelpipe.data.base import IGNORE_INDEX, DatasetSource, SampleRef, read_image, read_mask, read_pair

__all__ = [
    "IGNORE_INDEX",
    "DatasetSource",
    "SampleRef",
    "open_source",
    "read_image",
    "read_mask",
    "read_pair",
]


def open_source(
    root: Path | None,
    kind: str | None = None,
    digitscapes: dict | None = None,
    default_root: Path | None = None,
) -> DatasetSource:
    """Open a data set; with no root, the embedded DigitScapes (built on first use) at ``default_root``."""
    if root is None:
        from labelpipe.data.digitscapes import build_digitscapes

        assert default_root is not None
        params = digitscapes or {}
        root = build_digitscapes(
            default_root,
            seed=params.get("seed", 0),
            size=params.get("size", "default"),
            blend=params.get("blend", "alpha"),
            source_style=params.get("source_style", "textured"),
            difference_share=params.get("difference_share"),
        )
        kind = "folder"
    if kind in (None, "folder") and (Path(root) / "dataset.yaml").is_file():
        from labelpipe.data.folder import load_folder_dataset

        return load_folder_dataset(Path(root))
    from labelpipe.data.registry import open_dataset

    return open_dataset(Path(root), kind)
