"""The layers' import rules, read from the source: ``labelpipe/stages/`` holds only the verbs (no stage
imports another, nor does the library import a stage), and no module imports another's private name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "labelpipe"
CALLERS_OF_STAGES = {"cli.py", "entry.py", "pipeline.py"}  # above the stages: they call the verbs


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in ``path``, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def stage_imports(module: str, names: list[str]) -> list[str]:
    """The stage modules (or the stages package) an import brings in."""
    if module == "labelpipe.stages":
        return [f"labelpipe.stages.{n}" for n in names]
    if module.startswith("labelpipe.stages."):
        return [module]
    return ["labelpipe.stages"] if module == "labelpipe" and "stages" in names else []


def test_no_stage_imports_another_stage_and_the_library_imports_none():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in CALLERS_OF_STAGES:
            continue
        for module, names in imports(path):
            offenders += [f"{relative}: imports {target}" for target in stage_imports(module, names)]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        f"{path.relative_to(PACKAGE).as_posix()}: from {module} import {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, names in imports(path)
        if module.startswith("labelpipe")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_rules_see_a_stage_import_and_a_private_import(tmp_path):
    """The checks above can fail: they find both kinds of import in a module written to break them."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from labelpipe.stages.predict import run_predict\n"
        "def f():\n    from labelpipe import stages\n    from labelpipe.store.atomic import _alive\n"
    )
    found = imports(bad)
    assert [t for m, n in found for t in stage_imports(m, n)] == ["labelpipe.stages.predict", "labelpipe.stages"]
    assert ("labelpipe.store.atomic", ["_alive"]) in found
