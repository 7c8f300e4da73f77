"""Stage manifests: what a stage did, from what, and whether it is up to date.

``manifest.json`` holds status (running / done / failed), the fingerprint of the stage's inputs
(its config section, the data lists, upstream artifacts' hashes), the outputs with sha256 (and
size and mtime), the writer's pid and host, versions and wall time. A done stage with the same
fingerprint whose outputs are still the files it wrote is skipped; a running or failed one resumes
from what is on disk; ``--force`` redoes it.

"Still the files it wrote": each output must exist with its recorded size; when its mtime also
matches, that is taken as proof (cheap for stores of gigabytes); otherwise (copied, touched,
replaced) its sha256 is recomputed and compared. A truncated, swapped or corrupted artifact is
therefore never "up to date".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelpipe import __version__
from labelpipe.errors import LabelpipeError
from labelpipe.store.atomic import atomic_write_json, pid_alive, sha256_file, sweep_stale_temporaries

HOST = platform.node()  # socket.gethostname(), without importing socket


def versions() -> dict[str, str]:
    # The installed torch's version, read without importing torch (~1 GB and seconds for stages without it).
    return {"labelpipe": __version__, "torch": _torch_version(), "python": platform.python_version()}


def _torch_version() -> str:
    """torch's version: the imported module's, else the installed package's ``torch/version.py`` (read as
    text: importing ``importlib.metadata`` alone costs ~30 ms, a tenth of a pseudolabel run), else its
    distribution metadata; "none" when torch is not installed."""
    import sys
    from importlib.util import find_spec

    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    spec = find_spec("torch")
    if spec is None or spec.origin is None:
        return "none"
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
        match = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if match:
            return match.group(1)
    except OSError:
        pass
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


@dataclass
class StageDir:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # missing or torn: the stage is redone (or resumed from its checkpoint)

    def status(self) -> str:
        """done / running / paused / failed / interrupted (running, but its process on this host is gone) / missing."""
        manifest = self.manifest()
        return effective_status(manifest) if manifest else "missing"

    def output_problem(self, name: str, manifest: dict[str, Any] | None = None) -> str | None:
        """Why output ``name`` is not the file the stage recorded (None when it is)."""
        manifest = manifest if manifest is not None else self.manifest()
        if not manifest or manifest.get("status") != "done":
            return "its stage has not finished"
        recorded = manifest.get("outputs", {}).get(name)
        if recorded is None:
            return "its stage did not record it"
        path = self.path / name
        try:
            stat = path.stat()
        except OSError:
            return "it is missing"
        meta = manifest.get("files", {}).get(name, {})
        if "size" in meta and stat.st_size != meta["size"]:
            return f"it has {stat.st_size} bytes, {meta['size']} were written"
        if meta.get("mtime_ns") == stat.st_mtime_ns and "size" in meta:
            return None  # untouched since it was hashed
        try:
            if sha256_file(path) != recorded:
                return "its content differs from what was written"
        except OSError as exc:
            return f"it cannot be read ({exc.strerror or exc})"
        return None

    def is_up_to_date(self, fingerprint: str) -> bool:
        manifest = self.manifest()
        if not manifest or manifest.get("status") != "done" or manifest.get("fingerprint") != fingerprint:
            return False
        return all(self.output_problem(name, manifest) is None for name in manifest.get("outputs", {}))

    def check_output(self, name: str, rebuild: str) -> Path:
        """``self.path / name`` after checking it is what the stage wrote; else a one-line error naming
        the command ``rebuild`` that makes it again."""
        problem = self.output_problem(name)
        if problem is not None:
            raise LabelpipeError(f"{self.path / name}: not usable ({problem}); run `{rebuild}` to rebuild it")
        return self.path / name

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
                "pid": os.getpid(),
                "host": HOST,
                "versions": versions(),
            },
        )
        self._t0 = time.time()

    def finish(self, outputs: list[str], summary: dict[str, Any] | None = None) -> None:
        manifest = self.manifest() or {}
        files = {}
        for name in outputs:
            stat = (self.path / name).stat()
            files[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        manifest.update(
            status="done",
            outputs={name: sha256_file(self.path / name) for name in outputs},
            files=files,
            summary=summary or {},
            finished=time.time(),
            wall_s=round(time.time() - getattr(self, "_t0", time.time()), 2),
        )
        atomic_write_json(self.manifest_path, manifest)

    def pause(self, step: int, summary: dict[str, Any] | None = None) -> None:
        """Mark the stage paused after ``step`` steps on purpose (a ``select`` candidate that was not chosen):
        not done, resumable from its checkpoint, and not "interrupted" once its process is gone."""
        manifest = self.manifest() or {}
        manifest.update(
            status="paused",
            paused_at=step,
            summary=summary or {},
            wall_s=round(time.time() - getattr(self, "_t0", time.time()), 2),  # this attempt's, like finish()
        )
        atomic_write_json(self.manifest_path, manifest)

    def paused_at(self, fingerprint: str) -> int | None:
        """The step a paused stage of this fingerprint stopped at (None: not paused, or other settings)."""
        manifest = self.manifest() or {}
        if manifest.get("status") != "paused" or manifest.get("fingerprint") != fingerprint:
            return None
        return manifest.get("paused_at")

    def fail(self, error: str) -> None:
        """Mark the stage failed, best effort: on a full or read-only disk the manifest stays as it was
        (``status`` then reports the stage as interrupted once its process is gone)."""
        manifest = self.manifest() or {}
        manifest.update(status="failed", error=error)
        with contextlib.suppress(OSError, LabelpipeError):
            atomic_write_json(self.manifest_path, manifest)


def effective_status(manifest: dict[str, Any]) -> str:
    """The manifest's status, except that "running" becomes "interrupted" when the process that wrote it
    (on this host) no longer exists: a killed stage, resumable by running its command again."""
    status = manifest.get("status", "?")
    if status == "running" and manifest.get("host") == HOST and isinstance(manifest.get("pid"), int):
        if manifest["pid"] != os.getpid() and not pid_alive(manifest["pid"]):
            return "interrupted"
    return status
