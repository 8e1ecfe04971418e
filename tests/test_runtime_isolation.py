"""`import runtime` (and every runtime submodule a serving host loads) must never pull in torch.

Serving hosts and the Triton Python backend may not have torch (or the exporter) installed.
Each check runs in a fresh interpreter and inspects ``sys.modules``.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import runtime

FORBIDDEN = ("torch", "tensorrt", "exporter", "graph_passes", "students")


def _runtime_modules() -> list[str]:
    """Every module under runtime/, found by walking the package (new ones are covered too)."""
    names = [runtime.__name__]
    for m in pkgutil.walk_packages(runtime.__path__, prefix="runtime."):
        if ".triton_models" in m.name:  # runs inside tritonserver (imports triton_python_backend_utils)
            continue
        names.append(m.name)
    return sorted(names)


def _imports_in_fresh_interpreter(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return [m for m in r.stdout.strip().split(",") if m]


def test_import_runtime_does_not_import_torch():
    assert _imports_in_fresh_interpreter(["runtime"]) == []


def test_walk_finds_the_serving_and_triton_modules():
    mods = _runtime_modules()
    for expected in ("runtime.scorer", "runtime.serving.app", "runtime.triton.repository",
                     "runtime.backends.ort", "runtime.backends.tensorrt"):
        assert expected in mods


@pytest.mark.parametrize("module", _runtime_modules())
def test_runtime_module_does_not_import_torch(module):
    bad = _imports_in_fresh_interpreter([module])
    assert bad == [], f"importing {module} pulled in {bad}"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["triton", "--help"],
                                  ["export", "--help"]])
def test_cli_help_imports_no_torch(argv):
    """`ugsep --help` and the serving commands' help are instant on a host without torch."""
    code = (
        "import sys\nimport exporter.cli as c\n"
        f"try:\n    c.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "NO-TORCH"
    assert "usage: ugsep" in r.stdout


def test_every_backend_declares_the_protocol_attributes():
    """The scorer and the batcher read needs_gpu / group_chunk_candidates without getattr."""
    from runtime.backends import REGISTRY, Backend, backend_class

    declared = [a for a in Backend.__annotations__ if a != "name"]
    assert {"needs_gpu", "group_chunk_candidates"} <= set(declared)
    for name in REGISTRY:
        cls = backend_class(name)
        for attr in declared:
            assert attr in dir(cls), f"backend {name} does not declare {attr}"
        assert isinstance(cls.needs_gpu, bool) and isinstance(cls.group_chunk_candidates, int)


def test_triton_modules_do_not_import_each_other_in_a_cycle():
    import ast
    from pathlib import Path

    gpu = Path(runtime.__file__).parent / "triton" / "gpu.py"
    imported = {
        n.module for n in ast.walk(ast.parse(gpu.read_text())) if isinstance(n, ast.ImportFrom)
    }
    assert "runtime.triton.repository" not in imported
    code = "import runtime.triton.gpu, runtime.triton.repository"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
