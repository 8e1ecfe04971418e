"""The serve CLI wiring (argparse -> ServeOptions) and that serving never imports torch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import UgsepError
from runtime.serving import cli

ROOT = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_map_to_options(monkeypatch):
    monkeypatch.setenv("UGSEP_TEST_TOKEN", "t0k")
    args = _parse("b1", "b2", "--cache-mb", "1.5", "--max-queue", "7", "--max-candidates", "300",
                  "--token-env", "UGSEP_TEST_TOKEN", "--no-split", "--threads", "2")
    opts = cli.options_from_args(args)
    assert args.bundles == ["b1", "b2"] and args.host == "127.0.0.1" and args.port == 8000
    assert (opts.cache_bytes, opts.max_queue, opts.max_candidates) == (int(1.5 * 2**20), 7, 300)
    assert (opts.token, opts.use_split, opts.intra_op_threads) == ("t0k", False, 2)


def test_token_env_must_be_set(monkeypatch):
    monkeypatch.delenv("UGSEP_UNSET_TOKEN", raising=False)
    with pytest.raises(UgsepError, match="UGSEP_UNSET_TOKEN"):
        cli.options_from_args(_parse("b", "--token-env", "UGSEP_UNSET_TOKEN"))


def test_bad_bundle_exits_2_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.serving", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "neither a directory nor a .tar" in r.stderr


def test_serving_never_imports_torch():
    code = ("import sys, runtime.serving, runtime.serving.app, runtime.serving.server, runtime.serving.cli, runtime.serving.grpc_server;"
            "bad = [m for m in ('torch', 'tensorrt', 'exporter') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
