"""``ugsep serve``: argparse wiring. ``add_arguments(parser)`` then ``run(args)``.

    ugsep serve BUNDLE [BUNDLE ...] [--host 127.0.0.1] [--port 8000] [--grpc-port 8001] [--token-env VAR] ...

Also runnable without the exporter: ``python -m runtime.serving BUNDLE ...``.
"""

from __future__ import annotations

import argparse
import os

from runtime.errors import UgsepError
from runtime.serving.repository import ServeOptions
from runtime.signing import load_key
from runtime.signing_cli import add_verify_arguments

MB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the serve flags to ``p`` (a subcommand parser or a standalone one)."""
    d = ServeOptions()
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories or .tar archives")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                   help="also serve KServe v2 over gRPC on this port, same --host (default: off; Triton uses 8001)")
    p.add_argument("--backend", default=d.backend, help="onnxruntime, ort-cuda, ort-tensorrt, tensorrt or auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per graph (default: backend's)")
    p.add_argument("--thread-pool", choices=("session", "process"), default=d.thread_pool,
                   help="ONNX Runtime CPU: an intra-op pool per session (default), or one spinning "
                   "pool of --threads shared by every graph of the process (faster at small "
                   "batches with --threads >= 2; docs/serving.md)")
    p.add_argument("--allow-unverified", action="store_true", help="serve bundles without a passed parity record")
    p.add_argument("--no-split", action="store_true", help="serve full.onnx even when the bundle is split")
    p.add_argument("--cache-mb", type=float, default=d.cache_bytes / MB, help="user cache bound in MiB (0: off)")
    p.add_argument("--cache-ttl", type=float, default=d.cache_ttl_s, help="user cache TTL in seconds")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests before 429")
    p.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms, help="batcher wait for more requests (default 0: a batch is what queued while the last one ran; try 1-5 on GPUs)")
    p.add_argument("--max-batch-candidates", type=int, default=d.max_batch_candidates)
    p.add_argument("--group-chunk", type=int, default=d.group_chunk_candidates,
                   help="candidates per group-graph call within a batch (0: one call; default: backend's)")
    p.add_argument("--workers", type=int, default=d.workers, help="batches run concurrently")
    p.add_argument("--max-candidates", type=int, default=None, help="per-request limit (default: the bundle's)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MB)
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer $VAR' (the token is read from this env variable)")
    p.add_argument("--limit-concurrency", type=int, default=1024,
                   help="open connections before uvicorn answers 503 (health and metrics exempt)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request headers (idle ones close)")
    p.add_argument("--keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request body may take to arrive (else 408)")
    p.add_argument("--max-json-mb", type=float, default=d.max_json_bytes / MB,
                   help="size of a request's JSON part (big tensors: use the binary extension)")
    p.add_argument("--latency-budget-ms", type=float, default=None,
                   help="shed requests (429 + Retry-After) whose estimated completion exceeds this "
                        "(default: 2x the measured service time of a lone request)")
    p.add_argument("--enable-model-control", action="store_true",
                   help="enable POST /v2/repository/models/NAME/load|unload (needs a token)")
    p.add_argument("--model-control-token-env", default=None, metavar="VAR",
                   help="bearer token for load/unload, read from this env variable (default: --token-env's)")
    p.add_argument("--model-root", default=None, help="load/unload may only open bundles under this directory")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default="info")
    add_verify_arguments(p)
    p.add_argument("--embeddings", default=None, metavar="URL",
                   help="look the store's rows up in a Redis Cluster (redis://HOST:PORT) pinned to the "
                   "bundle's store version, instead of the bundle's own store (docs/embedding-tier.md)")
    p.add_argument("--embeddings-cache-mb", type=float, default=d.embeddings_cache_bytes / MB,
                   help="hot-row cache in front of the Redis tier, in MiB (0: off)")
    from runtime.redis_tier.cli import add_tier_arguments

    add_tier_arguments(p, required=False)


def _token(flag: str, var: str | None) -> str | None:
    if not var:
        return None
    token = os.environ.get(var)
    if not token:
        raise UgsepError(f"{flag} {var}: that environment variable is empty or unset")
    return token


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    token = _token("--token-env", args.token_env)
    return ServeOptions(
        backend=args.backend, allow_unverified=args.allow_unverified, use_split=not args.no_split,
        intra_op_threads=args.threads, thread_pool=args.thread_pool, cache_bytes=int(args.cache_mb * MB), cache_ttl_s=args.cache_ttl,
        max_queue=args.max_queue, max_delay_ms=args.max_delay_ms,
        max_batch_candidates=args.max_batch_candidates, group_chunk_candidates=args.group_chunk,
        workers=args.workers,
        max_candidates=args.max_candidates, max_body_bytes=int(args.max_body_mb * MB), token=token,
        max_json_bytes=int(args.max_json_mb * MB), body_timeout_s=args.body_timeout,
        latency_budget_ms=args.latency_budget_ms, enable_model_control=args.enable_model_control,
        model_root=args.model_root, control_token=_token("--model-control-token-env", args.model_control_token_env),
        verify=load_key(args.verify) if args.verify else None,
        allow_extra_files=args.allow_extra_files,
        embeddings=_tier(args), embeddings_cache_bytes=int(args.embeddings_cache_mb * MB),
        grpc_port=args.grpc_port, grpc_host=args.host,
    )


def _tier(args: argparse.Namespace):
    if not args.embeddings:
        return None
    from runtime.redis_tier.cli import tier_config

    return tier_config(args.embeddings, args)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    from runtime.serving.server import serve

    opts = options_from_args(args)
    serve(args.bundles, args.host, args.port, log_level=args.log_level,
          graceful_timeout_s=args.graceful_timeout, limit_concurrency=args.limit_concurrency,
          header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive, **vars(opts))
    return 0
