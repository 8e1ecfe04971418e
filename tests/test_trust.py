"""Nothing a checkpoint or manifest names is imported or called without the user's trust.

Each attack is a file a user might be handed; a marker file proves nothing ran. The CLI
is run as a subprocess (a real ``ugsep``), so an import really would execute code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from exporter.errors import ExportError
from exporter.load import load_student
from exporter.trust import Trust, UntrustedFactoryError, model_factory, resolve_factory
from tests.conftest import TOY_SPEC, TRUST

ROOT = Path(__file__).resolve().parents[1]


def _ugsep(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *argv],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**_env(), "PYTHONPATH": str(ROOT)},
    )


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _evil_checkpoint(d: Path, factory: str, kwargs: dict) -> Path:
    import torch

    d.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"factory": factory, "kwargs": kwargs}))
    (d / "spec.json").write_text(json.dumps(TOY_SPEC))
    return d


def _evil_module(tmp: Path, marker: Path) -> str:
    """A module that writes ``marker`` when imported, and has an unregistered callable."""
    pkg = tmp / "evilpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "def build(**kw):\n"
        f"    open({str(marker)!r}, 'w').write('called')\n"
    )
    return "evilpkg"


def test_os_system_in_config_json_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    ck = _evil_checkpoint(tmp_path / "ck", "os:system", {"command": f"touch {marker}"})
    r = _ugsep("export", str(ck), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not marker.exists(), "the checkpoint's config.json ran a command"
    msg = r.stdout + r.stderr
    assert "'os'" in msg and "--trust-module os" in msg and "nothing was imported" in msg
    assert "Traceback" not in msg


def test_untrusted_module_is_not_even_imported(tmp_path):
    marker = tmp_path / "IMPORTED"
    _evil_module(tmp_path, marker)
    ck = _evil_checkpoint(tmp_path / "ck", "evilpkg:build", {})
    r = _ugsep("export", str(ck), "--out", str(tmp_path / "out"), cwd=tmp_path)  # cwd on sys.path
    assert r.returncode == 2
    assert not marker.exists(), "an untrusted module was imported"
    assert "--trust-module evilpkg" in r.stdout + r.stderr


def test_trusted_module_still_needs_a_registered_factory(tmp_path):
    marker = tmp_path / "CALLED"
    _evil_module(tmp_path, marker)
    ck = _evil_checkpoint(tmp_path / "ck", "evilpkg:build", {})
    r = _ugsep("export", str(ck), "--out", str(tmp_path / "out"), "--trust-module", "evilpkg",
               cwd=tmp_path)
    assert r.returncode == 2
    assert marker.read_text() == "imported", "the unregistered callable was called"
    assert "not a registered model factory" in r.stdout + r.stderr


def test_arbitrary_attribute_of_a_trusted_package_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    # students.zoo imports names from other modules; none of them is a registered factory
    for ref in ("students.zoo:build_student", "students.checkpoint:save_file"):
        ck = _evil_checkpoint(tmp_path / ref.replace(":", "_"), ref, {})
        with pytest.raises(UntrustedFactoryError, match="not a registered model factory"):
            load_student(ck)
    with pytest.raises(ExportError, match="one attribute name"):
        resolve_factory("students.zoo:os.system", Trust.of(), named_by="test")
    assert not marker.exists()


def test_manifest_source_factory_is_refused_during_check(toy_bundle, tmp_path):
    """A bundle's manifest names the reference model: same rule (os:system through check)."""
    marker = tmp_path / "PWNED"
    bundle = shutil.copytree(toy_bundle, tmp_path / "b")
    weights = tmp_path / "w.safetensors"
    shutil.copy(Path(json.loads((bundle / "manifest.json").read_text())["source"]["checkpoint"])
                / "model.safetensors", weights)
    m = json.loads((bundle / "manifest.json").read_text())
    m["source"].update(checkpoint=str(weights), checkpoint_sha256=None, factory="os:system",
                       kwargs={"command": f"touch {marker}"})
    (bundle / "manifest.json").write_text(json.dumps(m))
    r = _ugsep("check", str(bundle), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not marker.exists()
    assert "manifest" in r.stdout + r.stderr and "--trust-module os" in r.stdout + r.stderr


def test_check_bundle_only_imports_nothing_the_manifest_names(toy_bundle, tmp_path):
    marker = tmp_path / "IMPORTED"
    _evil_module(tmp_path, marker)
    bundle = shutil.copytree(toy_bundle, tmp_path / "b")
    m = json.loads((bundle / "manifest.json").read_text())
    m["source"].update(factory="evilpkg:build")
    (bundle / "manifest.json").write_text(json.dumps(m))
    r = _ugsep("check", str(bundle), "--bundle-only", "--rows", "200", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists()
    assert "files verified" in r.stdout + r.stderr and "bundle check passed" in r.stdout + r.stderr


def test_trusted_registered_factory_loads(toy_checkpoint):
    assert load_student(toy_checkpoint, trust=TRUST).module is not None
    with pytest.raises(UntrustedFactoryError, match="--trust-module tests"):
        load_student(toy_checkpoint)  # the toy factory lives in tests/: not trusted by default


def test_factory_given_by_the_caller_trusts_its_module_only(toy_checkpoint):
    weights = toy_checkpoint / "model.safetensors"
    loaded = load_student(weights, factory="tests.conftest:make_toy_model", spec=TOY_SPEC)
    assert loaded.module is not None
    with pytest.raises(UntrustedFactoryError):  # the same name from a file is not trusted
        load_student(weights, factory="tests.conftest:make_toy_model", spec=TOY_SPEC,
                     factory_from="the manifest of bundle 'x'")


def test_registration_is_not_inherited():
    import torch

    @model_factory
    class Base(torch.nn.Module):
        pass

    class Child(Base):
        pass

    import tests.test_trust as me

    me.Base, me.Child = Base, Child
    trust = Trust.of(["tests"])
    assert resolve_factory("tests.test_trust:Base", trust, named_by="test") is Base
    with pytest.raises(UntrustedFactoryError, match="not a registered"):
        resolve_factory("tests.test_trust:Child", trust, named_by="test")


def test_trust_module_names_are_validated():
    with pytest.raises(ExportError, match="not a module name"):
        Trust.of(["os; rm -rf /"])
    assert Trust.of(["a.b"]).trusts("a.b.c") and not Trust.of(["a.b"]).trusts("a.bc")


def test_entry_point_registers_a_factory(tmp_path):
    """A distribution declaring the factory in the ``ugsep.models`` group registers it."""
    pkg = tmp_path / "eppkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "def build(**kw):\n    from tests.conftest import make_toy_model\n"
        "    return make_toy_model()\n"
        "def other(**kw):\n    raise SystemExit('must not be called')\n"
    )
    info = tmp_path / "eppkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eppkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ugsep.models]\ntoy = eppkg:build\n")
    code = (
        "from exporter.trust import Trust, resolve_factory, UntrustedFactoryError\n"
        "t = Trust.of(['eppkg'])\n"
        "assert callable(resolve_factory('eppkg:build', t, named_by='x'))\n"
        "try:\n    resolve_factory('eppkg:other', t, named_by='x')\n"
        "except UntrustedFactoryError as e:\n    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**_env(), "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "not a registered model factory" in r.stdout
