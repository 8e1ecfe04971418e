"""Regression tests for what fuzzing the gRPC endpoint found (tests/serving/test_fuzz_grpc.py),
each against a real in-process server on loopback, and the client-fault status mapping."""

from __future__ import annotations

import logging
import time

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtime.serving import ServerThread, build_app
from runtime.serving.grpc_server import MAX_DETAILS
from tests.serving.conftest import make_request
from tests.serving.fuzz_grpc import to_request

MODEL = "toysplit"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(split_bundle):
    app = build_app([split_bundle], grpc_port=0, max_body_bytes=1 << 20)
    with ServerThread(app) as srv, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}", options=[
            ("grpc.max_send_message_length", -1)]) as channel:
        yield srv, channel


def _request(seed: int = 1, n: int = 4) -> pb.ModelInferRequest:
    user, cands = make_request(seed, n)
    return to_request(MODEL, [{"name": k, "shape": list(v.shape), "datatype": "INT64" if v.dtype == np.int64
                               else "FP32", "data": v.reshape(-1).tolist()} for k, v in {**user, **cands}.items()])


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=30)
    return e.value


def test_bytes_that_are_no_protobuf_are_invalid_argument_not_unknown(served):
    """grpc answered UNKNOWN ("Unexpected DecodeError") before ProtocolGuard."""
    _, channel = served
    for method in ("ModelInfer", "ModelMetadata"):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        e = _error(call, b"\x00")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.code(), e.details())
        assert e.details().startswith(f"the request is not a valid {method} request message")
    e = _error(channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"), b"\n\x02\xff\xfe")  # bad UTF-8
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_shape_past_numpys_dims_is_invalid_argument_not_internal(served):
    """A 200,000-dim shape reached numpy's reshape (ValueError: INTERNAL) before the HTTP bounds applied."""
    _, channel = served
    req = _request()
    req.inputs[3].shape[:] = [1] * 200_000
    e = _error(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "input 'item_dense': 'shape' has 200000 dims; the limit is 32"


def test_a_huge_declared_shape_is_refused_by_the_spec_bound(served):
    _, channel = served
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = _request()
    req.inputs[2].shape[:] = [2**40, 2]  # item_ids, 2 x 2**40 elements in 64 bytes
    e = _error(stub.ModelInfer, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("input 'item_ids': shape [1099511627776, 2] holds more than 512 elements")
    typed = pb.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="item_dense", datatype="FP32", shape=[3, 2**62]).contents.fp32_contents.extend([0.5] * 6)
    e = _error(stub.ModelInfer, typed)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds more than" in e.details()


def test_a_long_model_name_gets_a_bounded_not_found(served):
    """The 100,000-character name was echoed into the status message, past the client's metadata
    limit: the client saw RESOURCE_EXHAUSTED ("received metadata size exceeds hard limit")."""
    _, channel = served
    req = _request()
    req.model_name = "m" * 100_000
    e = _error(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details()[:200])
    assert e.details().startswith("model 'mmm") and len(e.details()) <= MAX_DETAILS
    assert e.details().endswith("chars)")


def test_a_message_over_the_limit_is_resource_exhausted(served):
    _, channel = served
    req = _request()
    req.raw_input_contents[3] = bytes(2 << 20)
    e = _error(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.details()


def test_a_call_cancelled_while_queued_is_counted_and_never_scored(split_bundle, caplog):
    app = build_app([split_bundle], grpc_port=0, max_delay_ms=1500)
    with ServerThread(app) as srv, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        runs_before = dict(app.state.repo.graph_runs())[MODEL]
        with caplog.at_level(logging.INFO, logger="runtime.serving.grpc_server"):
            future = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_request(), timeout=30)
            time.sleep(0.4)  # queued: the batcher waits 1.5 s for company
            future.cancel()
            time.sleep(1.6)  # the batch would have run by now
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert dict(app.state.repo.graph_runs())[MODEL] == runs_before  # its batch never ran
    assert f'ugsep_client_disconnects_total{{model="{MODEL}"}} 1.0' in metrics
    assert 'reason="internal"' not in metrics
    assert any("cancelled its call" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)
