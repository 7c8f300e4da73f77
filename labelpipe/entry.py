"""The ``labelpipe`` console entry point: the one command that needs neither typer nor pydantic runs
without them.

``labelpipe pseudolabel --predictions FILE.h5 --out DIR [...]`` labels any network's prediction store
with numpy and h5py alone. Through the typer CLI (:mod:`labelpipe.cli`) the command would spend ~0.3 s
importing and running typer, pydantic and rich before and after ~0.3 s of labelling 100 maps of
256 x 512. So this module reads that command's options itself, with the defaults of
:mod:`labelpipe.defaults`, and calls the same stage function the typer command calls. It takes the
command only when it understands every argument and every value is valid; anything else (``--help``,
``--config``, ``--set``, an unknown option, a bad value, another command) goes to :mod:`labelpipe.cli`,
which parses, validates and reports errors as it always does. ``tests/test_entry.py`` checks that both
paths resolve the same settings and write the same labels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from labelpipe.defaults import EXPORT_FORMATS, PSEUDOLABEL_DEFAULTS, RUN_SEED_DEFAULT

# The options of `labelpipe pseudolabel` that go with --predictions (labelpipe.cli.pseudolabel), by
# flag: (the name in this module, how a value is read).
_VALUES: dict[str, tuple[str, Any]] = {
    "--predictions": ("predictions", Path),
    "--out": ("out", Path),
    "--prior": ("prior", Path),
    "--prior-from": ("prior_from", str),
    "--method": ("method", str),
    "--alpha": ("alpha", float),
    "--tau": ("tau", float),
    "--seed": ("seed", int),
    "--chunk-pixels": ("chunk_pixels", int),
    "--export": ("export", str),
}
_FLAGS: dict[str, tuple[str, bool]] = {
    "--force": ("force", True),
    "--plots": ("plots", True),
    "--no-plots": ("plots", False),
    "--debug": ("debug", True),
}


def lean_pseudolabel_options(args: list[str]) -> dict[str, Any] | None:
    """The options of ``args`` when they are a ``pseudolabel --predictions ... --out ...`` command this
    module can run (every argument known, every value valid); None otherwise (the typer CLI takes it)."""
    if not args or args[0] != "pseudolabel":
        return None
    options: dict[str, Any] = {}
    rest = iter(args[1:])
    for arg in rest:
        flag, sep, inline = arg.partition("=")
        if flag in _FLAGS and not sep:
            name, value = _FLAGS[flag]
            options[name] = value
            continue
        if flag not in _VALUES:
            return None
        name, read = _VALUES[flag]
        raw = inline if sep else next(rest, None)
        if raw is None or (not sep and raw.startswith("--")):  # a missing value: typer says what it wants
            return None
        try:
            options[name] = read(raw)
        except ValueError:
            return None
    if "predictions" not in options or "out" not in options or not _valid(options):
        return None
    return options


def _valid(options: dict[str, Any]) -> bool:
    """Whether every value passes the checks of ``PseudolabelConfig`` (and the method is registered)."""
    alpha, tau = options.get("alpha"), options.get("tau")
    if alpha is not None and not 0 < alpha <= 1:
        return False
    if tau is not None and not 0 <= tau <= 1:
        return False
    if options.get("seed", 0) < 0 or options.get("chunk_pixels", 1) < 1:
        return False
    if options.get("export", "none") not in EXPORT_FORMATS:
        return False
    if "method" in options:
        from labelpipe.pseudo.registry import check_method

        try:
            check_method(options["method"])
        except ValueError:
            return False
    return True


def lean_settings(options: dict[str, Any]) -> Any:
    """The :class:`labelpipe.pseudo.labelling.Settings` the typer path resolves for ``options``."""
    from labelpipe.pseudo.labelling import settings_from_values

    values = dict(PSEUDOLABEL_DEFAULTS)
    values.update({k: options[k] for k in ("method", "alpha", "tau", "export", "chunk_pixels") if k in options})
    values["plots"] = options.get("plots", False)  # with --predictions: no plots unless asked
    return settings_from_values(values, options.get("seed", RUN_SEED_DEFAULT))


def run_lean_pseudolabel(options: dict[str, Any]) -> None:
    """``labelpipe pseudolabel --predictions`` from parsed ``options``: what the typer command does."""
    from labelpipe.errors import exit_on_error

    with exit_on_error(options.get("debug", False)):
        from labelpipe.pseudo.ranks import process_ranks
        from labelpipe.stages.pseudolabel import pseudolabel_store

        prior_from = options.get("prior_from")
        pseudolabel_store(
            options["predictions"],
            options["out"],
            lean_settings(options),
            prior=options.get("prior"),
            prior_from=Path(prior_from) if prior_from else None,
            ranks=process_ranks(),
            force=options.get("force", False),
        )


def exit_without_teardown() -> None:
    """End a finished lean command with status 0 without tearing the interpreter down: freeing every module
    and array at exit costs ~17 ms, 5 % of labelling 100 maps, and a finished command needs none of it.
    Only when nothing is left to finish: no HDF5 file still open (its last writes would be lost) and no
    torch (a process group of many ranks closes at the normal exit); otherwise the normal exit runs."""
    h5py = sys.modules.get("h5py")
    if "torch" in sys.modules or (h5py is not None and h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """``labelpipe``: the lean path for the one command it serves, the typer CLI for everything else."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = lean_pseudolabel_options(args)
    if options is not None:
        run_lean_pseudolabel(options)
        if argv is None:  # the process is this command's own (the console script, python -m labelpipe)
            exit_without_teardown()
        return
    from labelpipe.cli import main as cli_main

    cli_main(args)
