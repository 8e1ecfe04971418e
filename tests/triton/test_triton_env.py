"""The Triton Python environment module: validation, clear errors, the server's process env."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.errors import BackendUnavailableError
from runtime.triton.env import ensure_triton_env, probe


def test_the_env_is_ready_and_idempotent(triton_env):
    again = ensure_triton_env(triton_env.venv)  # nothing to do the second time
    assert again == triton_env
    info = probe(triton_env.venv)
    assert info["python"] == triton_env.python_version and int(info["numpy"].split(".")[0]) < 2
    assert (triton_env.backend_dir / "python" / "triton_python_backend_stub").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "runtime.triton.env", "--venv", str(triton_env.venv), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "triton env ready" in r.stdout


def test_server_environment_uses_the_triton_venv(triton_env):
    env = triton_env.server_environ(
        {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "LD_LIBRARY_PATH": "/x"}
    )
    assert env["VIRTUAL_ENV"] == str(triton_env.venv) and "PYTHONPATH" not in env
    assert env["PATH"].startswith(str(triton_env.venv / "bin"))
    assert env["LD_LIBRARY_PATH"].split(":") == [str(triton_env.install.libs), "/x"]


def test_a_missing_env_is_a_clear_error_not_a_silent_creation(tmp_path):
    with pytest.raises(BackendUnavailableError, match="missing or incomplete.*runtime.triton.env"):
        ensure_triton_env(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    with pytest.raises(BackendUnavailableError, match="does not exist.*system interpreter"):
        ensure_triton_env(tmp_path / "absent", python=str(tmp_path / "no-python"))
    r = subprocess.run(
        [sys.executable, "-m", "runtime.triton.env", "--venv", str(tmp_path / "absent"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "missing or incomplete" in r.stderr


def test_runtime_triton_never_imports_torch():
    code = (
        "import sys, runtime.triton, runtime.triton.repository, runtime.triton.gpu, runtime.triton.cli,"
        " runtime.triton.server, runtime.triton.env, runtime.triton.config, runtime.triton.batch;"
        "bad = [m for m in ('torch', 'exporter', 'graph_passes', 'tritonclient') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
