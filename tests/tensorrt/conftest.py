"""Bundles for the TensorRT tests: the real split toy (tests.parity) and reference students."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def trt_split_master(tmp_path_factory):
    """A real split bundle (full/user/group) of the parity tests' two-tower toy."""
    from tests.parity.conftest import SplitToy, build_split_bundle

    out = tmp_path_factory.mktemp("trt_split") / "bundle"
    build_split_bundle(SplitToy().eval(), out)
    return out


@pytest.fixture()
def trt_split_bundle(trt_split_master, tmp_path):
    """A fresh copy per test (tests rewrite files in it)."""
    return shutil.copytree(trt_split_master, tmp_path / "bundle")
