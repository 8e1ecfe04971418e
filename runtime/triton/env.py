"""The environment tritonserver's Python backend runs in, created idempotently.

The ``tritonserver`` binary in the ``nvidia-pytriton`` wheel runs on the CPU with its
Python backend. What it needs (see the developer guide):

- the ``triton_python_backend_stub`` built for the interpreter's minor version, copied
  next to ``libtriton_python.so`` in a backend directory of our own (the wheel's
  site-packages is never modified);
- the wheel's ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``;
- ``PATH`` / ``VIRTUAL_ENV`` of a venv made from the *system* interpreter
  (``/usr/bin/python3.11``: the stub links against it; a pyenv build fails outright)
  holding ``numpy<2`` (the stub is built for the numpy 1 ABI: with numpy 2 outputs come
  back with the wrong size) and ``onnxruntime``.

``ensure_triton_env()`` builds or repairs that venv and backend directory and returns a
``TritonEnv`` that knows how to launch the server. Command line (idempotent, used by
``make test``)::

    python -m runtime.triton.env --venv .venv-triton            # create or validate
    python -m runtime.triton.env --venv .venv-triton --check    # validate only, exit 1 if not ready
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_SOURCE_TREE = Path(__file__).resolve().parents[2]
# What model.py needs inside Triton: the ugsep runtime is vendored into each repository,
# so only its two third-party dependencies are installed here.
# redis-py (+ hiredis) serves `ugsep triton --embeddings redis://…` (not probed: an existing
# venv without it is not rebuilt; add it with pip when a repository needs the Redis tier).
REQUIREMENTS = ("numpy>=1.24,<2", "onnxruntime>=1.20", "redis[hiredis]>=5")
STAMP = ".ugsep-triton-env.json"
_PROBE = (
    "import sys, json, numpy, onnxruntime;"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__,"
    " 'onnxruntime': onnxruntime.__version__}))"
)


def default_venv() -> Path:
    """``$UGSEP_TRITON_VENV``, else ``.venv-triton`` in a source checkout, else a user cache dir."""
    if os.environ.get("UGSEP_TRITON_VENV"):
        return Path(os.environ["UGSEP_TRITON_VENV"])
    if (_SOURCE_TREE / "pyproject.toml").is_file():
        return _SOURCE_TREE / ".venv-triton"
    return Path.home() / ".cache" / "ugsep" / "triton-venv"


@dataclass(frozen=True)
class TritonInstall:
    """Where the ``nvidia-pytriton`` wheel keeps tritonserver and its Python backend."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_version: str) -> Path:
        return self.root / "python_backend_stubs" / python_version / "triton_python_backend_stub"

    @classmethod
    def find(cls) -> TritonInstall:
        """Locate the wheel without importing it (pytriton's own imports are heavy)."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailableError(
                "tritonserver is not installed: the 'nvidia-pytriton' package ships it; "
                "install ugsep[triton]"
            )
        pkg = Path(next(iter(spec.submodule_search_locations)))
        install = cls(root=pkg / "tritonserver", libs=pkg.parent / "nvidia_pytriton.libs")
        for p in (install.binary, install.python_backend / "libtriton_python.so", install.libs):
            if not p.exists():
                raise BackendUnavailableError(
                    f"the nvidia-pytriton install is incomplete: '{p}' is missing"
                )
        return install


@dataclass(frozen=True)
class TritonEnv:
    """A ready venv + backend directory: everything needed to launch tritonserver."""

    venv: Path
    install: TritonInstall
    python_version: str

    @property
    def backend_dir(self) -> Path:
        return self.venv / "triton-backends"

    def server_environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The process environment tritonserver (and so the Python stub) must start with."""
        env = dict(os.environ if base is None else base)
        for var in ("PYTHONPATH", "PYTHONHOME", "LD_PRELOAD"):  # never leak the caller's venv
            env.pop(var, None)
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        libs = [str(self.install.libs)] + [
            p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p
        ]
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        return env


def _run(cmd: list[str], what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise BackendUnavailableError(
            f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}"
        )
    return r.stdout


def probe(venv: Path) -> dict[str, str] | None:
    """Versions inside ``venv`` when its python imports numpy<2 and onnxruntime, else None."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    info = json.loads(r.stdout.strip().splitlines()[-1])
    return info if int(info["numpy"].split(".")[0]) < 2 else None


def _install_backend(env: TritonEnv) -> None:
    """Our own backend dir: the wheel's python backend + the stub for this interpreter."""
    stub = env.install.stub(env.python_version)
    if not stub.exists():
        raise BackendUnavailableError(
            f"the nvidia-pytriton wheel has no Python backend stub for Python "
            f"{env.python_version} (looked for '{stub}')"
        )
    dst = env.backend_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for src in (
        *sorted(env.install.python_backend.glob("*.so")),
        env.install.python_backend / "triton_python_backend_utils.py",
        stub,
    ):
        target = dst / src.name
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            shutil.copy2(src, target)


def system_python(install: TritonInstall) -> str:
    """The system interpreter to build the venv from: one the wheel has a stub for (3.11 first)."""
    for version in ("3.11", "3.12", "3.10", "3.13", "3.9"):
        exe = Path(f"/usr/bin/python{version}")
        if exe.exists() and install.stub(version).exists():
            return str(exe)
    raise BackendUnavailableError(
        "no system Python (/usr/bin/python3.X) matches a Python backend stub of the "
        "nvidia-pytriton wheel; install python3.11 and python3.11-venv (apt-get)"
    )


def _create_venv(venv: Path, python: str) -> None:
    """``python -m venv`` + numpy<2 + onnxruntime; without ensurepip, our own pip installs."""
    if not Path(python).exists():
        raise BackendUnavailableError(
            f"'{python}' does not exist: the Python backend stub needs a venv made from the "
            "system interpreter (apt-get install python3.11-venv)"
        )
    log.info("creating the Triton Python environment at %s from %s", venv, python)
    quiet = ["-q", "--disable-pip-version-check"]
    try:
        _run([python, "-m", "venv", "--clear", str(venv)], "creating the Triton venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", *quiet]
    except BackendUnavailableError as e:  # e.g. Debian without python3.X-venv: no ensurepip
        log.warning("%s; retrying without pip in the venv", str(e).splitlines()[0])
        _run(
            [python, "-m", "venv", "--clear", "--without-pip", str(venv)],
            "creating the Triton venv",
        )
        pip = [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            *quiet,
        ]
    _run([*pip, *REQUIREMENTS], "installing numpy<2 and onnxruntime into the Triton venv")


def _ensure_redis(venv: Path) -> None:
    """redis-py for ``--embeddings`` repositories, added to a venv made before it was required."""
    py = str(venv / "bin" / "python")
    if subprocess.run([py, "-c", "import redis"], capture_output=True).returncode == 0:
        return
    own_pip = subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0
    pip = [py, "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python", py]
    _run([*pip, "install", "-q", "--disable-pip-version-check", REQUIREMENTS[-1]],
         "installing redis-py into the Triton venv")


def ensure_triton_env(
    venv: str | Path | None = None, python: str | None = None, *, create: bool = True
) -> TritonEnv:
    """Return a ready ``TritonEnv``, creating or repairing the venv when ``create``.

    Idempotent: a venv that already imports numpy<2 and onnxruntime is left alone.
    ``venv`` defaults to ``default_venv()``, ``python`` to ``system_python()``.
    """
    venv = Path(venv or default_venv()).absolute()
    install = TritonInstall.find()
    tag = hashlib.sha1(str(venv).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"ugsep-triton-env-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs: one creates, the others wait
        return _ensure_locked(venv, install, python, create)


def _ensure_locked(
    venv: Path, install: TritonInstall, python: str | None, create: bool
) -> TritonEnv:
    info = probe(venv)
    if info is None:
        if not create:
            raise BackendUnavailableError(
                f"the Triton Python environment '{venv}' is missing or incomplete; create it with "
                f"`python -m runtime.triton.env --venv {venv}`"
            )
        _create_venv(venv, python or system_python(install))
        info = probe(venv)
        if info is None:
            raise BackendUnavailableError(f"'{venv}' still does not import numpy<2 and onnxruntime")
    if create:
        _ensure_redis(venv)
    env = TritonEnv(venv=venv, install=install, python_version=info["python"])
    _install_backend(env)
    (venv / STAMP).write_text(json.dumps(info, indent=2) + "\n")
    return env


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.triton.env``: create or validate the Triton Python environment."""
    ap = argparse.ArgumentParser(
        prog="python -m runtime.triton.env", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--venv", default=str(default_venv()), help="where the venv lives (default: %(default)s)"
    )
    ap.add_argument(
        "--python",
        default=None,
        help="the system interpreter (default: /usr/bin/python3.11, or another with a stub)",
    )
    ap.add_argument("--check", action="store_true", help="only validate; exit 1 when not ready")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        env = ensure_triton_env(args.venv, args.python, create=not args.check)
    except BackendUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = json.loads((env.venv / STAMP).read_text())
    print(f"triton env ready: {env.venv} ({', '.join(f'{k} {v}' for k, v in info.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
