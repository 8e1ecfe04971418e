"""``ugsep triton BUNDLE --out REPO [--kind cpu|gpu]``: write a Triton model repository.

The ``ugsep`` command (exporter.cli) delegates here: it calls ``add_arguments(parser)``
on its ``triton`` subparser and ``run(args)`` when the subcommand is chosen. ``run``
returns the exit code; bundle problems raise ``UgsepError`` subclasses, which the
``ugsep`` command prints and turns into exit code 2.

    ugsep triton bundle/ --out repo/                      # CPU: Python backend + ugsep runtime
    ugsep triton bundle/ --out repo/ --kind gpu           # ORT/TensorRT stage models + BLS
    ugsep triton bundle/ --out repo/ --serve              # and run a local tritonserver on it
"""

from __future__ import annotations

import argparse
import time

from runtime.signing import load_key
from runtime.signing_cli import add_verify_arguments
from runtime.triton.repository import KINDS, RepositoryOptions, write_repository


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ugsep triton`` arguments to ``parser``."""
    d = RepositoryOptions()
    parser.add_argument("bundle", help="bundle directory or .tar")
    parser.add_argument(
        "--out", required=True, help="model repository directory (created; may hold other models)"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="cpu",
        help="cpu: one Python-backend model running the ugsep runtime; gpu: user/group "
        "graphs on onnxruntime or tensorrt_plan with a BLS orchestrator",
    )
    parser.add_argument("--name", default=None, help="top-level model name (default: the bundle's)")
    parser.add_argument("--instances", type=int, default=d.instances, help="instances per model")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=d.max_queue_delay_us,
        help="Triton dynamic batcher delay in microseconds",
    )
    parser.add_argument(
        "--user-cache-mb",
        type=float,
        default=d.user_cache_bytes / 2**20,
        help="user-side cache per model instance, MiB (0 disables)",
    )
    parser.add_argument("--user-cache-ttl-s", type=float, default=d.user_cache_ttl_s)
    parser.add_argument(
        "--max-batch-candidates",
        type=int,
        default=d.max_batch_candidates,
        help="candidates per group-graph call; larger Triton batches run as several calls",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=d.intra_op_threads,
        help="ONNX Runtime threads per CPU model instance (0: ORT default)",
    )
    parser.add_argument(
        "--stage-backend",
        default=d.stage_backend,
        choices=("auto", "onnxruntime", "tensorrt_plan", "python"),
        help="gpu kind: how the stage graphs are served (auto: TensorRT engines if "
        "the bundle has them, else onnxruntime)",
    )
    parser.add_argument(
        "--trt-version",
        default=None,
        help="gpu kind with engines: use only engines built by this TensorRT version (the Triton image's)",
    )
    parser.add_argument(
        "--allow-unverified",
        action="store_true",
        help="write a repository for a bundle without a passed parity check",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace models of the same name")
    add_verify_arguments(parser)
    parser.add_argument(
        "--embeddings", default=None, metavar="URL",
        help="cpu: look the store's rows up in this Redis Cluster (redis://HOST:PORT), pinned to the "
        "bundle's store version (push it with `ugsep embeddings push`)",
    )
    parser.add_argument("--embeddings-cache-mb", type=float, default=64.0,
                        help="hot-row cache in front of the Redis tier, per model instance")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="then start tritonserver on it (loopback, needs the triton env) until Ctrl-C",
    )


def options_from_args(args: argparse.Namespace) -> RepositoryOptions:
    return RepositoryOptions(
        model_name=args.name,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        user_cache_bytes=int(args.user_cache_mb * 2**20),
        user_cache_ttl_s=args.user_cache_ttl_s,
        max_batch_candidates=args.max_batch_candidates,
        intra_op_threads=args.intra_op_threads,
        allow_unverified=args.allow_unverified,
        stage_backend=args.stage_backend,
        trt_version=args.trt_version,
        embeddings=args.embeddings,
        embeddings_cache_bytes=int(args.embeddings_cache_mb * 2**20),
        overwrite=args.overwrite,
        verify=load_key(args.verify) if args.verify else None,
        allow_extra_files=args.allow_extra_files,
    )


def run(args: argparse.Namespace) -> int:
    """Write the repository (and optionally serve it); returns the exit code."""
    repo = write_repository(args.bundle, args.out, args.kind, options_from_args(args))
    print(f"wrote {repo.kind} Triton repository {repo.root}: models {', '.join(repo.models)}")
    print(
        f"entry model '{repo.model_name}': tritonserver --model-repository={repo.root.absolute()}"
    )
    if args.serve:
        from runtime.triton.server import TritonServer

        with TritonServer(repo.root) as server:
            print(
                f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url}, "
                f"metrics {server.metrics_url} (log {server.log_path}); Ctrl-C stops it"
            )
            try:
                while server.running:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return 0
