"""The generic folder layout: what users bring, and what the DigitScapes builder writes.

::

    ROOT/dataset.yaml      name, classes, palette, ignore_index, protocols, default_protocol (meta: ignored)
    ROOT/images/<id>.png   (or .jpg / .jpeg)
    ROOT/masks/<id>.png    single-channel uint8 class ids, 255 = ignore
    ROOT/splits/<name>.txt one image id a line

:func:`load_folder_dataset` turns it into a :class:`DatasetSource`; every problem with
``dataset.yaml`` is reported as a one-line :class:`LabelpipeError` naming the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labelpipe.data.base import IGNORE_INDEX, PROTOCOL_ROLES, DatasetSource, SampleRef, read_split_file
from labelpipe.errors import LabelpipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Channel = Annotated[int, Field(ge=0, le=255)]


class ProtocolSpec(BaseModel):
    """The split each role of a protocol reads (the same split may serve two roles)."""

    model_config = ConfigDict(extra="forbid")

    labeled: str
    unlabeled: str
    val: str
    test: str


class DatasetDescription(BaseModel):
    """The content of ``dataset.yaml``; unknown keys (``meta:`` and the like) are ignored."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    classes: list[str]
    palette: list[tuple[Channel, Channel, Channel]] | None = None
    ignore_index: Channel = IGNORE_INDEX
    protocols: dict[str, ProtocolSpec]
    default_protocol: str | None = None


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for data sets whose ``dataset.yaml`` gives no palette (class 0 black)."""
    colours = [(0, 0, 0)]
    for index in range(1, num_classes):
        # Golden-ratio hue steps keep neighbouring class ids apart in colour.
        hue = (index * 0.618033988749895) % 1.0
        colours.append(_hsv_to_rgb(hue, 0.75, 0.95))
    return colours[:num_classes]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    sector = int(hue * 6) % 6
    fraction = hue * 6 - int(hue * 6)
    p = value * (1 - saturation)
    q = value * (1 - fraction * saturation)
    t = value * (1 - (1 - fraction) * saturation)
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][sector]
    return tuple(int(round(255 * c)) for c in rgb)  # type: ignore[return-value]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_description(path: Path) -> DatasetDescription:
    if not path.is_file():
        raise LabelpipeError(
            f"{path}: dataset.yaml is missing; create it (name, classes, palette, protocols, "
            f"default_protocol) or point --root at the data set folder"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LabelpipeError(f"{path}: invalid YAML ({_one_line(exc)}); fix the syntax") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelpipeError(f"{path}: cannot read dataset.yaml ({_one_line(exc)}); replace the file") from exc
    if not isinstance(data, dict):
        raise LabelpipeError(f"{path}: dataset.yaml must be a mapping of keys (classes, palette, protocols, ...)")
    if not data.get("classes"):
        raise LabelpipeError(
            f"{path}: 'classes' is missing or empty; list the class names, e.g. classes: [background, road]"
        )
    if not data.get("protocols"):
        raise LabelpipeError(
            f"{path}: 'protocols' is missing or empty; add protocols: "
            f"{{NAME: {{labeled: SPLIT, unlabeled: SPLIT, val: SPLIT, test: SPLIT}}}}"
        )
    try:
        return DatasetDescription.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "dataset.yaml"
        raise LabelpipeError(f"{path}: {where}: {_one_line(first['msg'])}; fix this entry of dataset.yaml") from exc


def _check_description(path: Path, description: DatasetDescription, splits_dir: Path) -> str:
    """Cross-field checks; returns the default protocol's name."""
    classes = description.classes
    duplicates = sorted({name for name in classes if classes.count(name) > 1})
    if duplicates:
        raise LabelpipeError(f"{path}: class names {', '.join(duplicates)} appear twice; class names must be unique")
    if description.palette is not None and len(description.palette) != len(classes):
        raise LabelpipeError(
            f"{path}: palette has {len(description.palette)} colours but there are {len(classes)} classes; "
            f"give one [r, g, b] per class"
        )
    if description.ignore_index < len(classes):
        raise LabelpipeError(
            f"{path}: ignore_index {description.ignore_index} is a class id (there are {len(classes)} classes); use 255"
        )
    for protocol_name, spec in description.protocols.items():
        for role in PROTOCOL_ROLES:
            split_name = getattr(spec, role)
            split_file = splits_dir / f"{split_name}.txt"
            if not split_file.is_file():
                raise LabelpipeError(
                    f"{path}: protocol '{protocol_name}' uses split '{split_name}' as {role} but "
                    f"{split_file} does not exist; create it or fix the protocol"
                )
    known = ", ".join(sorted(description.protocols))
    default = description.default_protocol
    if default is None:
        if len(description.protocols) != 1:
            raise LabelpipeError(f"{path}: 'default_protocol' is missing; set it to one of: {known}")
        return next(iter(description.protocols))
    if default not in description.protocols:
        raise LabelpipeError(
            f"{path}: default_protocol '{default}' is not one of the protocols ({known}); fix default_protocol"
        )
    return default


def _file_names(folder: Path) -> set[str]:
    # One directory listing instead of a stat per id: splits of thousands of ids load instantly.
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries}


def load_folder_dataset(root: Path) -> DatasetSource:
    """Read a data set in the generic folder layout (see the module docstring).

    Every ``splits/*.txt`` becomes a split. A sample's image is ``images/<id>.png`` (else ``.jpg``,
    ``.jpeg``; the ``.png`` path when none exists, so reading it later names the missing file); its
    mask is ``masks/<id>.png`` when that exists, else None.
    """
    root = Path(root)
    path = root / "dataset.yaml"
    description = _read_description(path)
    splits_dir = root / "splits"
    default_protocol = _check_description(path, description, splits_dir)

    image_names = _file_names(root / "images")
    mask_names = _file_names(root / "masks")
    splits: dict[str, list[SampleRef]] = {}
    for split_file in sorted(splits_dir.glob("*.txt")):
        samples = []
        for sample_id in read_split_file(split_file):
            image_name = next(
                (sample_id + suffix for suffix in IMAGE_SUFFIXES if sample_id + suffix in image_names),
                sample_id + ".png",
            )
            mask = root / "masks" / f"{sample_id}.png" if f"{sample_id}.png" in mask_names else None
            samples.append(SampleRef(id=sample_id, image=root / "images" / image_name, mask=mask))
        splits[split_file.stem] = samples

    palette = description.palette or default_palette(len(description.classes))
    return DatasetSource(
        name=description.name or root.resolve().name,
        root=root,
        classes=list(description.classes),
        palette=[tuple(colour) for colour in palette],
        splits=splits,
        protocols={name: spec.model_dump() for name, spec in description.protocols.items()},
        default_protocol=default_protocol,
        ignore_index=description.ignore_index,
    )


def write_dataset_yaml(
    root: Path,
    *,
    name: str,
    classes: list[str],
    palette: list[tuple[int, int, int]],
    protocols: dict[str, dict[str, str]],
    default_protocol: str,
    ignore_index: int = IGNORE_INDEX,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/dataset.yaml`` (deterministic text: same arguments, same bytes)."""
    content: dict[str, Any] = {
        "name": name,
        "classes": list(classes),
        "palette": [[int(c) for c in colour] for colour in palette],
        "ignore_index": int(ignore_index),
        "protocols": {key: {role: value[role] for role in PROTOCOL_ROLES} for key, value in protocols.items()},
        "default_protocol": default_protocol,
    }
    if meta is not None:
        content["meta"] = meta
    path = Path(root) / "dataset.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False, default_flow_style=None, width=120))
    return path
