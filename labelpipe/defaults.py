"""The `pseudolabel` section's defaults, in plain Python (no import beyond the standard library).

:class:`labelpipe.config.PseudolabelConfig` (pydantic) declares its fields with these values, and the
lean ``labelpipe pseudolabel --predictions`` path (:mod:`labelpipe.entry`) builds the same settings from
them without importing pydantic or typer (together ~0.3 s of a command that labels 100 maps in ~0.3 s).
One source for both; ``tests/test_entry.py`` checks that the two paths resolve equal settings and equal
fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PSEUDOLABEL_DEFAULTS: dict[str, Any] = {
    "method": "dars",
    "alpha": 0.2,
    "tau": 0.9,
    "alpha_t": 0.2,
    "variance_percentile": None,
    "prior_from": None,
    "export": "none",
    "chunk_pixels": 2_000_000,
    "plots": True,
    "dars_sampling": "bernoulli",
}
EXPORT_FORMATS = ("none", "png")
# What a fingerprint leaves out (how a run goes, not what it computes) ...
PSEUDOLABEL_EXECUTION_ONLY = frozenset({"chunk_pixels", "plots"})
# ... and settings added after runs existed, hashed only when they differ from these (old runs stay valid).
PSEUDOLABEL_HASHED_WHEN_SET: dict[str, Any] = {"dars_sampling": "bernoulli"}
RUN_SEED_DEFAULT = 0


def pseudolabel_fingerprint_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The section's settings that define the labels: ``values`` (every field, by name) without the
    execution-only ones and without the hashed-when-set ones at their defaults."""
    fields = {k: v for k, v in values.items() if k not in PSEUDOLABEL_EXECUTION_ONLY}
    for name, default in PSEUDOLABEL_HASHED_WHEN_SET.items():
        if fields.get(name) == default:
            del fields[name]
    return fields
