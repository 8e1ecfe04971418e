"""``ugsep embeddings``: a bundle's embedding store in a Redis Cluster tier.

    ugsep embeddings push BUNDLE --redis redis://HOST:PORT    # resumable; re-run to complete
    ugsep embeddings ls --redis redis://HOST:PORT
    ugsep embeddings rm VERSION --redis redis://HOST:PORT
"""

from __future__ import annotations

import argparse

from runtime.redis_tier.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT_S,
    TierConfig,
)


def add_tier_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--redis URL and the timeout/retry flags (shared with serve's --embeddings)."""
    if required:
        p.add_argument("--redis", required=True, metavar="URL", help="any node of the cluster: redis://HOST:PORT")
    p.add_argument("--tier-timeout", type=float, default=DEFAULT_SOCKET_TIMEOUT_S, metavar="S",
                   help=f"socket timeout per Redis call (default {DEFAULT_SOCKET_TIMEOUT_S})")
    p.add_argument("--tier-connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S",
                   help=f"connect timeout (default {DEFAULT_CONNECT_TIMEOUT_S})")
    p.add_argument("--tier-retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                   help=f"retries after a connection error or timeout (default {DEFAULT_RETRIES})")


def tier_config(url: str, args: argparse.Namespace) -> TierConfig:
    return TierConfig(url, socket_timeout_s=args.tier_timeout, connect_timeout_s=args.tier_connect_timeout,
                      retries=args.tier_retries)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="embeddings_cmd", required=True)
    push = sub.add_parser("push", help="write the bundle's store tables as one version (resumable)")
    push.add_argument("bundle", metavar="BUNDLE")
    push.add_argument("--buckets", type=int, default=None, help="hashes per table (default: >= 32, <= 64 MiB each)")
    push.add_argument("--chunk-rows", type=int, default=None, help="rows per pipelined write (default: ~4 MiB)")
    add_tier_arguments(push)
    ls = sub.add_parser("ls", help="list the versions in the tier")
    add_tier_arguments(ls)
    rm = sub.add_parser("rm", help="delete one version (its marker first)")
    rm.add_argument("version")
    add_tier_arguments(rm)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    config = tier_config(args.redis, args)
    if args.embeddings_cmd == "push":
        return _push(args, config, console)
    if args.embeddings_cmd == "ls":
        return _ls(config, console)
    from runtime.redis_tier.push import remove_version

    n = remove_version(config, args.version)
    console.print(f"removed version {args.version} from {config.name} ({n} keys)")
    return 0


def _push(args: argparse.Namespace, config: TierConfig, console) -> int:
    from runtime.bundle import Bundle
    from runtime.redis_tier.push import push
    from runtime.redis_tier.store import bundle_tables, store_version

    bundle = Bundle.open(args.bundle)
    version = store_version(bundle)
    r = push(config, bundle_tables(bundle), version, buckets=args.buckets, chunk_rows=args.chunk_rows,
             progress=True)
    console.print(f"pushed version {version} to {config.name}: {r.rows} rows, {r.bytes / 2**20:.1f} MiB, "
                  f"{r.chunks_written} chunks written, {r.chunks_skipped} already there, {r.seconds:.1f} s")
    return 0


def _ls(config: TierConfig, console) -> int:
    from rich.table import Table

    from runtime.redis_tier.push import list_versions

    table = Table("version", "complete", "tables", "rows", "MiB")
    for v in list_versions(config):
        table.add_row(v.version, "yes" if v.complete else "NO (push again)", ", ".join(sorted(v.tables)),
                      str(sum(t.rows for t in v.tables.values())), f"{v.nbytes / 2**20:.1f}")
    console.print(table)
    return 0
