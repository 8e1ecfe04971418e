"""Pushing a store's tables into Redis Cluster as one version, listing and removing versions.

A push writes the meta key first, then every table in chunks of rows: one pipeline per
chunk, one HSET per bucket the chunk touches, sent to every node before any reply is
read. A chunk is recorded in the progress hash only after all its writes succeeded, so
re-running an interrupted push skips the recorded chunks and rewrites the rest (HSET of
the same bytes is idempotent). The ``done`` marker is written last; readers accept a
version only once it exists. Removal deletes the marker first, so a half-removed version
is never served.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import BundleError
from runtime.redis_tier.connection import TierConfig, connect, tier_errors
from runtime.redis_tier.layout import (
    KEY_PREFIX,
    TableLayout,
    bucket_key,
    check_name,
    decode_meta,
    done_key,
    encode_meta,
    meta_key,
    progress_key,
    version_of_meta_key,
    with_buckets,
)
from runtime.redis_tier.tables import TableSource

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 << 20


@dataclass
class PushReport:
    """What a push did: chunks written now vs found done by an earlier run."""

    version: str
    rows: int = 0
    bytes: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0


@dataclass
class VersionInfo:
    """One version found in the tier."""

    version: str
    complete: bool
    tables: dict[str, TableLayout] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())


def push(config: TierConfig | str, tables: Sequence[TableSource], version: str, *, buckets: int | None = None,
         chunk_rows: int | None = None, progress: bool = False, client=None) -> PushReport:
    """Write ``tables`` as ``version`` (resuming an interrupted push of the same version)."""
    config = TierConfig(config) if isinstance(config, str) else config
    check_name("version", version)
    client = client or connect(config)
    report = PushReport(version)
    t0 = time.perf_counter()
    with tier_errors(config, f"pushing version {version}"):
        layouts = _start(client, config, version, [with_buckets(t.layout, version, buckets) for t in tables])
        done = {k.decode() for k in client.hkeys(progress_key(version))}
        plan = [(src, layouts[src.layout.name], _chunk_rows(src.layout, chunk_rows)) for src in tables]
        total = sum(math.ceil(t.rows / n) for _, t, n in plan)
        with _progress_bar(progress, total, version) as advance:
            for src, layout, n in plan:
                _push_table(client, src, layout, n, done, report, advance)
        report.rows = sum(t.rows for t in layouts.values())
        report.bytes = sum(t.nbytes for t in layouts.values())
        report.seconds = time.perf_counter() - t0
        client.set(done_key(version), json.dumps({"rows": report.rows, "bytes": report.bytes,
                                                  "pushed_at": time.time()}))
    return report


def _start(client, config: TierConfig, version: str, layouts: list[TableLayout]) -> dict[str, TableLayout]:
    """Write the meta key, or check an earlier (interrupted) push's meta matches and reuse it."""
    raw = client.get(meta_key(version))
    if raw is None:
        client.set(meta_key(version), encode_meta(version, layouts))
        return {t.name: t for t in layouts}
    old = decode_meta(raw, f"embedding tier {config.name} version {version}")
    if sorted(old) != sorted(t.name for t in layouts) or not all(old[t.name].same_table(t) for t in layouts):
        raise BundleError(
            f"embedding tier {config.name} already holds version {version} with other tables "
            f"({', '.join(sorted(old))}); remove it first: ugsep embeddings rm {version} --redis {config.name}"
        )
    return old


def _chunk_rows(t: TableLayout, chunk_rows: int | None) -> int:
    return int(chunk_rows or max(256, CHUNK_BYTES // t.row_nbytes))


def _push_table(client, src: TableSource, t: TableLayout, n: int, done: set[str], report: PushReport, advance) -> None:
    for c in range(math.ceil(t.rows / n)):
        tag = f"{t.name}/{c}"
        if tag in done:
            report.chunks_skipped += 1
        else:
            start, stop = c * n, min(t.rows, (c + 1) * n)
            _write_chunk(client, t, start, src.raw_rows(start, stop))
            client.hset(progress_key(report.version), tag, 1)  # only after every write succeeded
            report.chunks_written += 1
        advance()


def _write_chunk(client, t: TableLayout, start: int, raw: np.ndarray) -> None:
    if raw.shape != (len(raw), t.row_nbytes):
        raise BundleError(f"table '{t.name}': rows of {raw.shape[1]} bytes, expected {t.row_nbytes}")
    ids = np.arange(start, start + len(raw))
    buckets = ids % t.buckets
    pipe = client.pipeline()
    for b in np.unique(buckets).tolist():
        sel = np.flatnonzero(buckets == b)
        pipe.hset(bucket_key(t, b), mapping={str(start + i): raw[i].tobytes() for i in sel.tolist()})
    pipe.execute()


class _progress_bar:
    """A rich progress bar over chunks (a no-op when ``show`` is False)."""

    def __init__(self, show: bool, total: int, version: str) -> None:
        self.show, self.total, self.version = show, total, version

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=False)
        self._bar.__enter__()
        task = self._bar.add_task(f"push {self.version[:12]}", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.show:
            self._bar.__exit__(*exc)


def list_versions(config: TierConfig | str, *, client=None) -> list[VersionInfo]:
    """Every version in the tier (complete or not), sorted by name."""
    config = TierConfig(config) if isinstance(config, str) else config
    client = client or connect(config)
    with tier_errors(config, "listing versions"):
        keys = {k.decode() for k in client.scan_iter(match=f"{KEY_PREFIX}:{{*}}:meta", count=1000)}
        infos = []
        for key in sorted(keys):
            v = version_of_meta_key(key)
            raw = client.get(key)
            if raw is None:
                continue
            tables = decode_meta(raw, f"embedding tier {config.name} version {v}")
            infos.append(VersionInfo(v, client.exists(done_key(v)) == 1, tables))
    return infos


def remove_version(config: TierConfig | str, version: str, *, client=None) -> int:
    """Delete every key of ``version`` (marker first); returns the number of keys removed."""
    config = TierConfig(config) if isinstance(config, str) else config
    check_name("version", version)
    client = client or connect(config)
    with tier_errors(config, f"removing version {version}"):
        raw = client.get(meta_key(version))
        if raw is None:
            raise BundleError(f"embedding tier {config.name} holds no version {version}")
        tables = decode_meta(raw, f"embedding tier {config.name} version {version}")
        n = client.unlink(done_key(version))
        for t in tables.values():
            n += client.unlink(*[bucket_key(t, b) for b in range(t.buckets)])
        n += client.unlink(progress_key(version), meta_key(version))
    log.info("removed version %s from %s (%d keys)", version, config.name, n)
    return n
