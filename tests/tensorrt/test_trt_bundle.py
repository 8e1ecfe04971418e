"""Bundle-level TensorRT hooks on the CPU: --trt-lint, build-trt refusals, engine selection,
optimization profiles, and the runtime backend's availability reasons."""

from __future__ import annotations

import json

import onnx
import onnx.helper as oh
import pytest

import runtime
from exporter.cli import main
from exporter.errors import ExportError
from exporter.steps.tensorrt import batch_ranges, build_engines, stage_profiles
from exporter.steps.write import update_bundle
from runtime.backends import resolve_backend
from runtime.backends.tensorrt import TrtBackend, engine_dir_name, select_engine
from runtime.bundle import Bundle
from runtime.errors import BackendUnavailableError


def _plant_unique(bundle_dir, stage: str = "group") -> str:
    """Insert a Unique node (TensorRT: unsupported) on the first input of a stage graph.

    Its result is not a graph output: the stage's outputs stay the manifest's (the bundle's
    structural checks refuse a graph whose outputs differ), the node is still in the file."""
    path = bundle_dir / f"{stage}.onnx"
    model = onnx.load(str(path))
    src = model.graph.input[0].name
    model.graph.node.append(oh.make_node("Unique", [src], ["planted_unique_y"], name="planted"))
    update_bundle(bundle_dir, {f"{stage}.onnx": model})
    return src


def test_trt_lint_passes_on_a_real_split_bundle(trt_split_bundle, capsys):
    assert main(["check", "--trt-lint", str(trt_split_bundle)]) == 0
    out = capsys.readouterr().err
    for stage in ("full", "user", "group"):
        assert f"{stage}.onnx: ready for TensorRT" in out


def test_trt_lint_fails_on_a_planted_unsupported_op(trt_split_bundle, capsys):
    _plant_unique(trt_split_bundle)
    assert main(["check", "--trt-lint", str(trt_split_bundle)]) == 1
    out = capsys.readouterr().err
    assert "group.onnx: NOT ready for TensorRT (1 error(s)" in out
    assert "Unique 'planted'" in out and "user.onnx: ready for TensorRT" in out


def test_build_trt_refuses_unready_graphs_before_touching_tensorrt(trt_split_bundle):
    _plant_unique(trt_split_bundle)
    with pytest.raises(ExportError, match=r"(?s)not ready for TensorRT.*Unique 'planted'"):
        build_engines(trt_split_bundle)


def test_build_trt_without_tensorrt_says_what_to_install(trt_split_bundle, capsys):
    if TrtBackend.availability(None) is None:
        pytest.skip("this machine can build engines (see test_trt_gpu.py)")
    with pytest.raises(
        ExportError, match=r"(?s)cannot build TensorRT engines here: .*ugsep\[gpu\]"
    ):
        build_engines(trt_split_bundle)
    assert main(["build-trt", str(trt_split_bundle)]) == 2
    assert "cannot build TensorRT engines here" in capsys.readouterr().err
    assert Bundle.open(trt_split_bundle).manifest.engines == []  # nothing half-written


def test_profiles_put_users_on_m_and_candidates_on_n(trt_split_bundle):
    bundle = Bundle.open(trt_split_bundle)
    m = bundle.manifest
    m_range, n_range = batch_ranges(m, None, "1,100,2000")
    assert (m_range.min, m_range.opt, m_range.max) == (1, 8, m.limits.max_users_per_call)
    user = stage_profiles(bundle.stage_path("user"), "user", m, m_range, n_range)
    # SPLIT_SPEC: user_ids [3] int64, user_dense [4]
    assert user == {
        "user_ids": ((1, 3), (8, 3), (256, 3)),
        "user_dense": ((1, 4), (8, 4), (256, 4)),
    }
    group = stage_profiles(bundle.stage_path("group"), "group", m, m_range, n_range)
    boundary = {b.name for b in m.split.boundary}
    assert boundary and boundary < set(group)
    for name, (lo, opt, hi) in group.items():
        want = (1, 8, 256) if name in boundary else (1, 100, 2000)
        assert (lo[0], opt[0], hi[0]) == want, name
    assert group["item_ids"] == ((1, 2), (100, 2), (2000, 2))
    assert group["user_index"] == ((1,), (100,), (2000,))
    with pytest.raises(ExportError, match="min <= opt <= max"):
        batch_ranges(m, "8,4,16", None)


def _with_engines(bundle_dir, entries):
    files = {}
    for e in entries:
        files[f"{e['dir']}/user.plan"] = b"not a real plan"
        e["files"] = [f"{e['dir']}/user.plan"]
    update_bundle(bundle_dir, files, engines=entries)
    return Bundle.open(bundle_dir)  # still verifies: plans are listed with their sha256


def test_select_engine_refuses_another_gpu_or_tensorrt_version(trt_split_bundle):
    l4 = {"gpu": "NVIDIA L4", "compute_capability": "8.9", "trt_version": "10.7.0"}
    bundle = _with_engines(
        trt_split_bundle, [{"dir": engine_dir_name("NVIDIA L4", "10.7.0"), **l4}]
    )
    assert bundle.manifest.engines[0].dir == "engines/nvidia-l4-trt10.7.0"
    here = {"gpu": "NVIDIA L4", "compute_capability": "8.9"}
    assert select_engine(bundle, here, "10.7.0").dir == "engines/nvidia-l4-trt10.7.0"
    a100 = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    with pytest.raises(BackendUnavailableError) as e:
        select_engine(bundle, a100, "10.7.0")
    msg = str(e.value)
    assert "NVIDIA L4 (sm 8.9, TensorRT 10.7.0)" in msg and "NVIDIA A100-SXM4-80GB (sm 8.0)" in msg
    assert "ugsep build-trt" in msg
    with pytest.raises(BackendUnavailableError, match="with TensorRT 10.8.0"):
        select_engine(bundle, here, "10.8.0")


def test_select_engine_on_a_bundle_without_engines(trt_split_bundle):
    with pytest.raises(BackendUnavailableError, match="has no TensorRT engines; build them"):
        select_engine(
            Bundle.open(trt_split_bundle), {"gpu": "x", "compute_capability": "9.0"}, "10"
        )


def test_tensorrt_backend_availability_and_load_say_what_to_install(trt_split_bundle):
    reason = TrtBackend.availability(Bundle.open(trt_split_bundle))
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    assert "tensorrt is not installed" in reason or "no NVIDIA GPU" in reason
    assert "pip install 'ugsep[gpu]'" in reason
    with pytest.raises(BackendUnavailableError) as e:
        runtime.load(trt_split_bundle, backend="tensorrt", allow_unverified=True)
    assert "backend 'tensorrt' is not usable here" in str(e.value) and "ugsep[gpu]" in str(e.value)
    # auto skips it (with the reason) and lands on a backend that works here
    be = resolve_backend("auto", Bundle.open(trt_split_bundle))
    assert be.name in ("onnxruntime", "ort-cuda", "ort-tensorrt")


def test_import_runtime_backends_tensorrt_imports_no_tensorrt_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, runtime.backends.tensorrt as t; t.TrtBackend.availability(None);"
        "print(json.dumps([m for m in ('torch', 'exporter', 'graph_passes') if m in sys.modules]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", "import json;" + code], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_ort_gpu_providers_need_a_device_not_just_the_provider_name():
    import ctypes.util

    from runtime.backends.ort import OrtCudaBackend, _no_gpu_reason

    if ctypes.util.find_library("cuda"):
        pytest.skip("an NVIDIA driver is installed here")
    assert "no NVIDIA driver" in _no_gpu_reason()
    assert OrtCudaBackend.availability() is not None  # whichever onnxruntime is installed
