"""`import runtime` must never pull in torch (serving hosts may not have it)."""

from __future__ import annotations

import subprocess
import sys


def test_import_runtime_does_not_import_torch():
    code = (
        "import sys, runtime, runtime.bundle, runtime.scorer, runtime.backends.ort, runtime.sample;"
        "bad = [m for m in ('torch', 'tensorrt', 'exporter', 'graph_passes') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
