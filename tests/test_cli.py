"""The `ugsep` command itself: exit codes and messages a user sees."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from exporter.cli import main

UGSEP = str(Path(sys.executable).with_name("ugsep"))


def test_console_script_help():
    r = subprocess.run([UGSEP, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "export", "check", "inspect", "demo", "bench", "serve", "triton"):
        assert cmd in r.stdout


def test_export_then_inspect(toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["export", str(toy_checkpoint), "--out", str(out), "--no-split", "--no-parity",
                 "--trust-module", "tests"]) == 0
    assert (out / "manifest.json").is_file()
    assert main(["inspect", str(out)]) == 0
    err = capsys.readouterr().err
    assert "toy" in err and "full.onnx" in err and "parity: none recorded" in err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "--factory" in capsys.readouterr().err


def test_tampered_bundle_inspect_fails(toy_bundle, tmp_path, capsys):
    b = shutil.copytree(toy_bundle, tmp_path / "b")
    with open(b / "full.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["inspect", str(b)]) == 2
    assert "does not match its manifest sha256" in capsys.readouterr().err
