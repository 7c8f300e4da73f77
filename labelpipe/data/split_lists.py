"""Split lists in the formats semi-supervised papers publish, resolved to an adapter's samples.

One entry a line; blank lines and ``#`` comments are skipped. Three formats, mixable::

    aachen_000000_000019                       a bare id (or ``aachen/aachen_000000_000019``, ``2007_000032``)
    leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png          an image path alone
    JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png        an ``image mask`` pair

Paths are relative to the data set root; a leading ``/`` (the DeepLab ``train_aug.txt`` style) is
dropped, and an absolute path elsewhere is matched by its file name.

The mask column is accepted and deliberately not used: an adapter always reads *its own* mask for
the image (Cityscapes: the ``gtFine_labelIds`` file, mapped to trainIds in code). So a Cityscapes list
naming ``..._gtFine_labelTrainIds.png`` files works whether or not those files were ever generated,
and every mask of a data set goes through the same decoder.

Folder convention under ``ROOT/splits/`` (the UniMatch / U2PL layout): ``NAME.txt`` is the split
``NAME``; ``FOLDER/labeled.txt`` (+ optional ``unlabeled.txt``, ``val.txt``, ``test.txt``) is the
protocol ``semi-FOLDER``. See :func:`load_user_splits`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from labelpipe.data.base import SampleRef
from labelpipe.errors import LabelpipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS_DIR = "splits"


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split list. ``id`` is set for a bare id, ``image`` (root-relative, POSIX) for a
    path; ``mask`` is the second column when the line has one (kept for reports, not for reading)."""

    line: int
    id: str | None
    image: str | None
    mask: str | None = None

    @property
    def text(self) -> str:
        return self.id if self.id is not None else str(self.image)


def _normalise_path(token: str, root: Path) -> str:
    token = token.replace("\\", "/")
    path = Path(token)
    if path.is_absolute():
        try:
            return path.relative_to(root.resolve()).as_posix()
        except ValueError:
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                pass
    posix = PurePosixPath(token.lstrip("/"))
    parts = [part for part in posix.parts if part != "."]
    return "/".join(parts)


def _is_path(token: str) -> bool:
    return token.lower().endswith(IMAGE_SUFFIXES)


def parse_split_list(path: Path, root: Path) -> list[SplitEntry]:
    """Entries of a split list file, in file order. Raises a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LabelpipeError(f"{path}: split list is missing; create it with one image id per line")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelpipeError(f"{path}: cannot read split list ({exc}); replace the file") from exc
    entries = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        tokens = raw_line.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) > 2:
            raise LabelpipeError(
                f"{path}: line {number} has {len(tokens)} fields; write an id, an image path, or 'IMAGE MASK'"
            )
        first = tokens[0]
        for token in tokens:  # a list names images of this data set: '..' would step out of the root
            if ".." in token.replace("\\", "/").split("/"):
                raise LabelpipeError(
                    f"{path}: line {number}: '{token}' points outside the data root ('..'); write paths "
                    "relative to the root"
                )
        mask = _normalise_path(tokens[1], Path(root)) if len(tokens) == 2 else None
        if _is_path(first):
            entries.append(SplitEntry(line=number, id=None, image=_normalise_path(first, Path(root)), mask=mask))
        elif mask is not None:
            raise LabelpipeError(
                f"{path}: line {number}: '{first}' is not an image path but is followed by a mask; "
                f"write 'IMAGE MASK' with file suffixes, or the id alone"
            )
        else:
            entries.append(SplitEntry(line=number, id=first.strip("/"), image=None))
    return entries


_AMBIGUOUS = object()


class SampleIndex:
    """Looks samples up by every name a published list may use for them.

    Exact names (the id, the root-relative image path) win over loose ones (the image's file name,
    its stem, the stem without an adapter suffix such as ``_leftImg8bit``, the id's last part).
    A loose name shared by two samples is ambiguous and reported as such when used.
    """

    def __init__(self, root: Path, samples: Iterable[SampleRef], suffixes: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self._exact: dict[str, object] = {}
        self._loose: dict[str, object] = {}
        for sample in samples:
            self._add(self._exact, sample.id, sample)
            self._add(self._exact, self._relative(sample.image), sample)
            name = sample.image.name
            stem = sample.image.stem
            loose = {name, stem, sample.id.rsplit("/", 1)[-1]}
            loose.update(stem[: -len(suffix)] for suffix in suffixes if suffix and stem.endswith(suffix))
            for alias in loose:
                self._add(self._loose, alias, sample)

    def _relative(self, image: Path) -> str:
        try:
            return image.relative_to(self.root).as_posix()
        except ValueError:
            return image.as_posix()

    @staticmethod
    def _add(table: dict[str, object], alias: str, sample: SampleRef) -> None:
        known = table.get(alias)
        if known is None:
            table[alias] = sample
        elif known is not _AMBIGUOUS and known != sample:
            table[alias] = _AMBIGUOUS

    def lookup(self, entry: SplitEntry) -> SampleRef | None | object:
        """The sample an entry names, None when nothing matches, ``_AMBIGUOUS`` when several do."""
        if entry.image is not None:
            image = PurePosixPath(entry.image)
            aliases = [entry.image, image.name, image.stem]
        else:
            assert entry.id is not None
            aliases = [entry.id, entry.id.rsplit("/", 1)[-1]]
        for table in (self._exact, self._loose):
            for alias in aliases:
                found = table.get(alias)
                if found is not None:
                    return found
        return None


def resolve_split_list(
    path: Path,
    root: Path,
    samples: Iterable[SampleRef] | SampleIndex,
    *,
    suffixes: Sequence[str] = (),
    skip_ids: Collection[str] = (),
) -> list[SampleRef]:
    """The samples a split list names, in list order, each once.

    ``samples`` is every sample the adapter knows (all splits), or a prebuilt :class:`SampleIndex`;
    ``suffixes`` are file-stem endings
    a bare id may omit (``_leftImg8bit``); entries naming a sample in ``skip_ids`` (pairs the adapter
    already skipped and reported) are dropped. Unmatched or ambiguous entries raise one error that
    names the file, the first bad line and how many lines fail.
    """
    path = Path(path)
    index = samples if isinstance(samples, SampleIndex) else SampleIndex(root, samples, suffixes)
    resolved: list[SampleRef] = []
    seen: set[str] = set()
    missing: list[SplitEntry] = []
    ambiguous: list[SplitEntry] = []
    for entry in parse_split_list(path, root):
        found = index.lookup(entry)
        if found is None:
            missing.append(entry)
        elif found is _AMBIGUOUS:
            ambiguous.append(entry)
        else:
            assert isinstance(found, SampleRef)
            if found.id in skip_ids or found.id in seen:
                continue
            seen.add(found.id)
            resolved.append(found)
    if ambiguous:
        entry = ambiguous[0]
        raise LabelpipeError(
            f"{path}: line {entry.line}: '{entry.text}' matches several images ({len(ambiguous)} such "
            f"lines); write the full id (e.g. city/stem) or the image path"
        )
    if missing:
        entry = missing[0]
        more = f" ({len(missing)} lines fail)" if len(missing) > 1 else ""
        raise LabelpipeError(
            f"{path}: line {entry.line}: '{entry.text}' matches no image under {root}{more}; "
            f"fix the list or restore the images"
        )
    return resolved


def load_user_splits(
    root: Path,
    samples: Iterable[SampleRef] | SampleIndex,
    *,
    pool: str,
    val: str,
    builtin: dict[str, list[SampleRef]],
    suffixes: Sequence[str] = (),
    skip_ids: Collection[str] = (),
) -> tuple[dict[str, list[SampleRef]], dict[str, dict[str, str]]]:
    """Splits and protocols from the user's lists under ``root/splits/``.

    ``NAME.txt`` -> split ``NAME`` (it replaces a built-in split of that name: the user's list is the
    explicit choice). ``FOLDER/X.txt`` -> split ``FOLDER/X``; a folder with ``labeled.txt`` gives the
    protocol ``semi-FOLDER``: labeled ``FOLDER/labeled``; unlabeled ``FOLDER/unlabeled`` (when the file
    is absent, the split ``pool`` minus the labeled images, written as ``FOLDER/unlabeled``); val and
    test ``FOLDER/val`` / ``FOLDER/test`` when given, else the split ``val``.

    Returns (new splits, new protocols); ``builtin`` is read (for ``pool``) and not modified.
    """
    splits_dir = Path(root) / SPLITS_DIR
    splits: dict[str, list[SampleRef]] = {}
    protocols: dict[str, dict[str, str]] = {}
    if not splits_dir.is_dir():
        return splits, protocols
    index = samples if isinstance(samples, SampleIndex) else SampleIndex(root, samples, suffixes)

    def resolve(list_path: Path) -> list[SampleRef]:
        return resolve_split_list(list_path, root, index, skip_ids=skip_ids)

    for list_path in sorted(splits_dir.glob("*.txt")):
        splits[list_path.stem] = resolve(list_path)
    for folder in sorted(p for p in splits_dir.iterdir() if p.is_dir()):
        for list_path in sorted(folder.glob("*.txt")):
            splits[f"{folder.name}/{list_path.stem}"] = resolve(list_path)
        if not (folder / "labeled.txt").is_file():
            continue
        labeled = f"{folder.name}/labeled"
        unlabeled = f"{folder.name}/unlabeled"
        if unlabeled not in splits:
            pool_samples = splits.get(pool, builtin.get(pool))
            if pool_samples is None:
                raise LabelpipeError(
                    f"{folder / 'unlabeled.txt'}: missing and there is no '{pool}' split to take the "
                    f"unlabeled images from; add unlabeled.txt"
                )
            labeled_ids = {sample.id for sample in splits[labeled]}
            splits[unlabeled] = [sample for sample in pool_samples if sample.id not in labeled_ids]
        val_split = f"{folder.name}/val" if f"{folder.name}/val" in splits else val
        test_split = f"{folder.name}/test" if f"{folder.name}/test" in splits else val_split
        protocols[f"semi-{folder.name}"] = {
            "labeled": labeled,
            "unlabeled": unlabeled,
            "val": val_split,
            "test": test_split,
        }
    return splits, protocols
