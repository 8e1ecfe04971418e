"""The exporter's layout is the pipeline: no step imports (directly or through helpers) a
step that runs after it. Read from the PIPELINE list and the source (ast), not from a list
kept by hand; imports under ``if TYPE_CHECKING:`` (the typed context) do not count."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from exporter.pipeline import PIPELINE

ROOT = Path(__file__).resolve().parents[1]


def _file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str) -> set[str]:
    """exporter.* modules ``module`` imports at run time (any depth in the file), with their
    parent packages (importing a.b.c runs a/b/__init__.py)."""
    f = _file(module)
    is_pkg = f is not None and f.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    parts = module.split(".")[: len(module.split(".")) - child.level + is_pkg]
                    base = ".".join(parts + ([base] if base else []))
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.add(full if _file(full) else base)
            visit(child)

    visit(ast.parse(f.read_text()))
    out = set()
    for name in found:
        if name.split(".")[0] != "exporter":
            continue
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if _file(".".join(parts[:i])))
    return out


def _closure(module: str) -> dict[str, list[str]]:
    """Every exporter module ``module`` imports, transitively, with one import chain to it."""
    seen = {module: [module]}
    todo = [module]
    while todo:
        m = todo.pop()
        for n in _imported(m):
            if n not in seen:
                seen[n] = [*seen[m], n]
                todo.append(n)
    return seen


def _step_of(module: str, steps: dict[str, tuple[int, int]]) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["exporter", "steps"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in steps else None


def _positions() -> dict[str, tuple[int, int]]:
    """Step module (exporter.steps.<name>) -> (first, last) position of its steps in PIPELINE."""
    pos: dict[str, tuple[int, int]] = {}
    for i, (_, fn) in enumerate(PIPELINE):
        parts = fn.__module__.split(".")
        assert parts[:2] == ["exporter", "steps"], f"{fn.__name__} lives outside exporter/steps/"
        first, _ = pos.get(parts[2], (i, i))
        pos[parts[2]] = (first, i)
    return pos


def test_every_pipeline_step_lives_in_its_step_module():
    pos = _positions()
    assert set(pos) >= {"capture", "split", "optimize", "quantize", "threads", "write", "parity"}


@pytest.mark.parametrize("step", sorted(_positions()))
def test_no_step_imports_a_later_step(step):
    pos = _positions()
    _, last = pos[step]
    late = []
    for chain in _closure(f"exporter.steps.{step}").values():
        other = _step_of(chain[-1], pos)
        if other is not None and other != step and pos[other][0] > last:
            late.append(" -> ".join(chain))
    assert not late, f"step '{step}' imports later steps: {late}"


def test_the_check_sees_an_import_of_a_later_step(tmp_path, monkeypatch):
    """The reader finds function-level imports and skips TYPE_CHECKING ones."""
    pkg = tmp_path / "exporter" / "steps"
    pkg.mkdir(parents=True)
    (tmp_path / "exporter" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "late.py").write_text("")
    (pkg / "early.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from exporter import pipeline\n"
        "def f():\n    from exporter.steps import late\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imported("exporter.steps.early") == {"exporter.steps", "exporter.steps.late"}
