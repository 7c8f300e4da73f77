"""The registry of pseudo-label generators: what the config, the CLI, the streaming driver, the stage and the
tests know about a method, declared once per method, in the method's own module.

A generator labels a prediction store in two passes (``labelpipe.pseudo.streaming`` drives them):

- pass 1 histograms one float16 store column, per predicted class (``Histogram(column, per_class=True)``,
  which also reads ``label``) or over all pixels, and :attr:`PseudoLabelGenerator.fit` turns that
  histogram (summed over every chunk and every process, so sharded runs fit the same parameters) into the
  method's parameters (thresholds, a cutoff, ...): a dict of numpy values that ``report.json`` records;
- pass 2, :attr:`PseudoLabelGenerator.label`, labels one piece of pixels (flat arrays of the
  ``pass2_columns``, at most ``dars.PIECE_PIXELS`` of them) with those parameters and returns
  ``(labels uint8, 255 = not kept; weights float16 or None)``.

A generator reads the ``pseudolabel`` config fields it names in ``settings`` (required, not None) and
``optional_settings``; the stage fingerprints every ``pseudolabel`` field, so a field added for a new
generator is part of the fingerprint without further code.

Adding a generator is one module (see README, "Adding a pseudo-label generator")::

    from labelpipe.pseudo.registry import Histogram, PseudoLabelGenerator, register_generator

    def fit(hist, settings, prior):              # hist: Float16Histogram of pass 1 (or None)
        return {"threshold": hist.kth_largest_overall(max(1, math.ceil(settings["alpha"] * hist.total())))}

    def label(params, piece, rng):               # piece: {"label": (n,) uint8, "conf": (n,) float16}
        keep = piece["conf"] >= params["threshold"]
        return np.where(keep, piece["label"], 255).astype(np.uint8), None

    register_generator(PseudoLabelGenerator(
        name="my_method", settings=("alpha",), histogram=Histogram("conf", per_class=False),
        pass2_columns=("label", "conf"), fit=fit, label=label))

Built-in generators live in this package's modules and are found by importing them (every module of
``labelpipe.pseudo`` except the torch ones); a generator defined elsewhere is registered by importing its
module before the config is validated. Numpy only: the config imports this module lazily to validate
``method``, and the pseudolabel path stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from labelpipe.pseudo.histogram import Float16Histogram

# Modules of labelpipe.pseudo that define no generator: torch's online split, and the labelling of a store
# around the generators (I/O, the run's data set): importing them to find generators would only cost time.
_NOT_SCANNED = frozenset({"entropy_online", "labelling", "prior", "ranks", "report", "run_store"})


@dataclass(frozen=True)
class Histogram:
    """What pass 1 histograms: the float16 store ``column`` (values < 0 clamped to 0), with one row per
    predicted class when ``per_class`` (pass 1 then reads ``label`` too), else one row for all pixels."""

    column: str
    per_class: bool = False

    def rows(self, num_classes: int) -> int:
        return num_classes if self.per_class else 1

    def columns(self) -> tuple[str, ...]:
        """The store columns pass 1 reads."""
        return (self.column, "label") if self.per_class else (self.column,)


FitFn = Callable[["Float16Histogram | None", Mapping[str, Any], "np.ndarray | None"], dict[str, Any]]
LabelFn = Callable[
    [Mapping[str, Any], Mapping[str, "np.ndarray"], "np.random.Generator | None"],
    tuple["np.ndarray", "np.ndarray | None"],
]


@dataclass(frozen=True)
class PseudoLabelGenerator:
    """One pseudo-label method, as every layer sees it.

    name: the ``--method`` / ``pseudolabel.method`` value (also the stage's output folder).
    settings / optional_settings: the ``pseudolabel`` config fields ``fit`` and ``label`` read; the
        required ones must not be None. ``fit`` gets exactly these, by field name.
    pass2_columns: the store columns pass 2 reads, ``label`` first; every one is a (H, W) per-pixel column.
    fit: ``(hist, settings, prior) -> params``: the parameters from pass 1's histogram (``None`` when
        :meth:`histogram` is None) and, when ``needs_prior``, the (C,) float64 labeled class prior.
    label: ``(params, piece, rng) -> (labels, weights)``: one piece, flat (n,) arrays of ``pass2_columns``;
        labels (n,) uint8 in ``piece["label"]``'s dtype, weights (n,) float16 when ``weights``, else None.
    histogram: what pass 1 histograms (None: no pass 1); a callable of the settings when that depends on
        them (variance histograms only when a percentile cut is asked for).
    weights: pass 2 emits per-pixel weights (labels.h5 gets a ``weight`` column).
    random: pass 2 draws from ``rng``; the driver passes one generator for all chunks, in store order, and
        skips it over the pixels of other processes' shards (``dars.skip_draws``): ``label`` must draw
        exactly one float32 per pixel, in order, for sharded and chunked labels to equal one pass's.
    needs_prior: ``fit`` needs the labeled class prior (``--predictions`` then needs ``--prior``).
    display_column: the float16 column whose histogram the report plots (default: the last pass-2 column).
    per_image: ``label`` must see one whole image per call (a per-image rule such as DARS's exact-count
        sampling), not pieces of ``PIECE_PIXELS``; a callable of the fitted params when that depends on
        them. The driver then needs the chunk's image sizes, and callers must not cut images into bands.
    """

    name: str
    pass2_columns: tuple[str, ...]
    fit: FitFn
    label: LabelFn
    settings: tuple[str, ...] = ()
    optional_settings: tuple[str, ...] = ()
    histogram: Histogram | Callable[[Mapping[str, Any]], Histogram | None] | None = None
    weights: bool = False
    random: bool = False
    needs_prior: bool = False
    display_column: str | None = None
    per_image: bool | Callable[[Mapping[str, Any]], bool] = False

    def labels_per_image(self, params: Mapping[str, Any]) -> bool:
        """Whether pass 2 must hand ``label`` whole images with these fitted params."""
        return bool(self.per_image(params)) if callable(self.per_image) else self.per_image

    def pass1(self, settings: Mapping[str, Any]) -> Histogram | None:
        """What pass 1 histograms with these settings (None: pass 1 reads nothing)."""
        if callable(self.histogram):
            return self.histogram(self.select(settings))
        return self.histogram

    def select(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings this generator reads, checked: ``ValueError`` names a required one that is missing."""
        chosen = {}
        for key in self.settings:
            if settings.get(key) is None:
                raise ValueError(f"method {self.name!r} needs {key}")
            chosen[key] = settings[key]
        for key in self.optional_settings:
            chosen[key] = settings.get(key)
        return chosen

    @property
    def value_column(self) -> str:
        return self.display_column or self.pass2_columns[-1]


_GENERATORS: dict[str, PseudoLabelGenerator] = {}
_scanned = False


def register_generator(generator: PseudoLabelGenerator) -> PseudoLabelGenerator:
    """Make ``generator`` available as ``--method NAME``; returns it. Registering another generator under
    a taken name is an error (the same one again is not)."""
    name = generator.name
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"pseudo-label generator name {name!r}: use letters, digits, '_' or '-'")
    if name in _GENERATORS and _GENERATORS[name] != generator:
        raise ValueError(f"pseudo-label generator {name!r} is registered twice")
    if not generator.pass2_columns or generator.pass2_columns[0] != "label":
        raise ValueError(f"pseudo-label generator {name!r}: pass2_columns must start with 'label'")
    _GENERATORS[name] = generator
    return generator


def unregister_generator(name: str) -> None:
    """Remove a generator (tests that register a toy one clean up with this)."""
    _GENERATORS.pop(name, None)


def _scan_builtins() -> None:
    """Import every module of ``labelpipe.pseudo`` once, so that the built-in generators register."""
    global _scanned
    if _scanned:
        return
    _scanned = True
    import pkgutil

    import labelpipe.pseudo as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_SCANNED and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")


def _import_namesake(name: str) -> None:
    """Import ``labelpipe.pseudo.<name>`` when there is such a module: a built-in generator lives in the
    module of its name, so one method's run imports one method's module, not every module."""
    if name in _NOT_SCANNED or not name.isidentifier():
        return
    try:
        importlib.import_module(f"labelpipe.pseudo.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"labelpipe.pseudo.{name}":  # the module exists and lacks a dependency: say so
            raise


def generator_names() -> tuple[str, ...]:
    """The registered methods' names: the built-ins by module name, then the others in registration order
    (whichever method a run imported first)."""
    _scan_builtins()

    def order(generator: PseudoLabelGenerator) -> tuple:
        module = getattr(generator.fit, "__module__", None) or ""
        return (0, module) if module.startswith("labelpipe.pseudo.") else (1,)

    return tuple(g.name for g in sorted(_GENERATORS.values(), key=order))


def get_generator(name: str) -> PseudoLabelGenerator:
    """The generator called ``name``; ``ValueError`` naming the registered ones when there is none."""
    if name not in _GENERATORS:
        _import_namesake(name)
    if name not in _GENERATORS:
        _scan_builtins()
    if name not in _GENERATORS:
        raise ValueError(f"unknown pseudo-label method {name!r}; choose one of {', '.join(_GENERATORS)}")
    return _GENERATORS[name]


def check_method(name: str) -> str:
    """``name`` when a generator of that name is registered (the config's validator), else ValueError."""
    return get_generator(name).name
