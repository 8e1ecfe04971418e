"""One ONNX graph on ONNX Runtime (CPU) in Triton's Python backend (written by ``ugsep triton``).

Used for the stage models of a GPU-topology repository with ``stage_backend="python"``:
inputs and outputs are exactly the graph's, no batching (max_batch_size 0).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ugsep"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.triton.triton_models import _common  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from runtime.backends.ort import OrtBackend

        here = _common.version_dir(args)
        threads = int(_common.parameters(args).get("intra_op_threads") or 0) or None
        self.session = OrtBackend(intra_op_threads=threads).open_path(str(here / "model.onnx"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {
                    n: pb_utils.get_input_tensor_by_name(request, n).as_numpy()
                    for n in self.session.input_names
                }
                out = self.session.run(feeds)
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in out.items()])
                )
            except Exception as e:  # noqa: BLE001 - this request's error only
                responses.append(_common.error_response(e))
        return responses
