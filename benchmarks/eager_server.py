"""The baseline for bench_serve: the eager PyTorch model per request, on the same HTTP stack.

FastAPI + uvicorn and the same KServe v2 codec (runtime.serving.protocol) and request
validation (runtime.validate) as ``ugsep serve``; the difference is what runs: the
checkpoint's ``nn.Module`` on the request's rows (the user's features repeated for each
of the N candidates, as the model was trained), one request at a time on one worker
thread with ``torch.set_num_threads(--threads)``.

    python benchmarks/eager_server.py --checkpoint CKPT_DIR --port 8001 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.errors import RequestError  # noqa: E402
from runtime.serving.protocol import HEADER_LENGTH, encode_response, parse_infer  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402
from runtime.validate import check_candidates, check_user  # noqa: E402


def build_eager_app(checkpoint: str | Path, threads: int = 1, max_candidates: int = 4096) -> FastAPI:
    from students.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    spec = FeatureSpec.load(Path(checkpoint) / "spec.json")
    name = spec.name
    pool = ThreadPoolExecutor(1, thread_name_prefix="eager")

    def score(user: dict, cands: dict, n: int) -> dict[str, np.ndarray]:
        feeds = {k: torch.from_numpy(np.repeat(v, n, axis=0)) for k, v in user.items()}
        feeds.update({k: torch.from_numpy(v) for k, v in cands.items()})
        with torch.inference_mode():
            out = model(**feeds)
        return {spec.outputs[0]: out.numpy()}

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200)

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        try:
            req = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
            user = check_user(spec, {s.name: req.inputs[s.name] for s in spec.user_inputs})
            cands, n = check_candidates(spec, {s.name: req.inputs[s.name] for s in spec.group_inputs}, max_candidates)
        except (RequestError, KeyError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        out = await asyncio.get_running_loop().run_in_executor(pool, score, user, cands, n)
        content, headers = encode_response(name, "1", req, out)
        return Response(content=content, headers=headers)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    app = build_eager_app(args.checkpoint, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
