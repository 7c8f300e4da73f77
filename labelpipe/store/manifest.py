"""Stage manifests: what a stage did, from what, and whether it is up to date.

``manifest.json`` holds status (running / done / failed), the fingerprint of the stage's inputs
(its config section, the data lists, upstream artifacts' hashes), the outputs with sha256,
versions and wall time. A done stage with the same fingerprint is skipped; a running or failed
one resumes from what is on disk; ``--force`` redoes it.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labelpipe import __version__
from labelpipe.store.atomic import atomic_write_json, sha256_file, sweep_stale_temporaries


def versions() -> dict[str, str]:
    return {"labelpipe": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class StageDir:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def status(self) -> str:
        manifest = self.manifest()
        return manifest["status"] if manifest else "missing"

    def is_up_to_date(self, fingerprint: str) -> bool:
        manifest = self.manifest()
        if not manifest or manifest.get("status") != "done" or manifest.get("fingerprint") != fingerprint:
            return False
        return all((self.path / name).is_file() for name in manifest.get("outputs", {}))

    def begin(self, stage: str, fingerprint: str, inputs: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(self.path)  # what a killed attempt was writing
        previous = self.manifest() or {}
        atomic_write_json(
            self.manifest_path,
            {
                "stage": stage,
                "status": "running",
                "fingerprint": fingerprint,
                "inputs": inputs,
                "started": previous.get("started") if previous.get("fingerprint") == fingerprint else time.time(),
                "attempts": previous.get("attempts", 0) + 1 if previous.get("fingerprint") == fingerprint else 1,
                "versions": versions(),
            },
        )
        self._t0 = time.time()

    def finish(self, outputs: list[str], summary: dict[str, Any] | None = None) -> None:
        manifest = self.manifest() or {}
        manifest.update(
            status="done",
            outputs={name: sha256_file(self.path / name) for name in outputs},
            summary=summary or {},
            finished=time.time(),
            wall_s=round(time.time() - getattr(self, "_t0", time.time()), 2),
        )
        atomic_write_json(self.manifest_path, manifest)

    def fail(self, error: str) -> None:
        manifest = self.manifest() or {}
        manifest.update(status="failed", error=error)
        atomic_write_json(self.manifest_path, manifest)
