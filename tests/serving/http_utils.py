"""Helpers for driving a real server over HTTP (plain JSON bodies and tritonclient)."""

from __future__ import annotations

import numpy as np
import tritonclient.http as triton

from runtime.serving.protocol import kserve_datatype


def json_body(user: dict, cands: dict, **parameters) -> dict:
    """A KServe v2 JSON infer body: user inputs [1, ...], candidate inputs [N, ...]."""
    inputs = [
        {"name": k, "shape": list(v.shape), "datatype": kserve_datatype(v.dtype), "data": v.reshape(-1).tolist()}
        for k, v in {**user, **cands}.items()
    ]
    body = {"inputs": inputs}
    if parameters:
        body["parameters"] = parameters
    return body


def triton_inputs(user: dict, cands: dict, binary: bool) -> list:
    out = []
    for k, v in {**user, **cands}.items():
        i = triton.InferInput(k, list(v.shape), triton.np_to_triton_dtype(v.dtype))
        i.set_data_from_numpy(v, binary_data=binary)
        out.append(i)
    return out


def triton_scores(client, model: str, user: dict, cands: dict, binary: bool) -> np.ndarray:
    outputs = [triton.InferRequestedOutput("ctr", binary_data=binary)]
    return client.infer(model, triton_inputs(user, cands, binary), outputs=outputs).as_numpy("ctr")
