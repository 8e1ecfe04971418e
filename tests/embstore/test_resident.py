"""A store file over ``map_limit`` is read with pread (runtime.embstore.MmapStore): random
lookups give exactly the rows of the mapped path (fp32, fp16, int8) and leave this process's
RSS where it was, while the mapped path (the control) grows with the rows touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from exporter.steps.embeddings import rowwise_int8
from runtime.embstore import MmapStore
from runtime.manifest.sections import StoreTable

ROWS, DIM = 1 << 19, 16  # 32 MiB of float32


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _store(tmp_path, kind: str):
    w = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    path = tmp_path / f"{kind}.safetensors"
    if kind == "int8":
        q, sb = rowwise_int8(w)
        save_file({"t.qweight": q, "t.scale_bias": sb}, str(path))
        tensors, want = {"qweight": "t.qweight", "scale_bias": "t.scale_bias"}, q * sb[:, :1] + sb[:, 1:2]
    else:
        dt = {"float32": np.float32, "float16": np.float16}[kind]
        save_file({"t": w.astype(dt)}, str(path))
        tensors, want = {"weight": "t"}, w.astype(dt).astype(np.float32)
    meta = [StoreTable(name="t", rows=ROWS, dim=DIM, dtype={"int8": "int8_rowwise"}.get(kind, kind),
                       tensors=tensors)]
    return want.astype(np.float32), path, meta


def _touch(store: MmapStore, calls: int = 30, n: int = 2000):
    rng = np.random.default_rng(1)
    before = _rss_file_mib()
    pairs = []
    for _ in range(calls):
        ids = rng.integers(0, ROWS, size=(n, 2))
        ids[0] = ids[1]  # duplicate ids are plain repeated rows
        pairs.append((ids, store.lookup("t", ids).copy()))
    return _rss_file_mib() - before, pairs


@pytest.mark.parametrize("kind", ["float32", "float16", "int8"])
def test_pread_store_gives_the_rows_and_leaves_rss_alone(tmp_path, kind):
    want, path, meta = _store(tmp_path, kind)
    read = MmapStore(path, meta, map_limit=1 << 20)
    assert read.pread
    grew, pairs = _touch(read)
    for ids, got in pairs:
        assert got.shape == (*ids.shape, DIM)
        np.testing.assert_array_equal(got, want[ids])
    mapped = MmapStore(path, meta, map_limit=None)  # the control: np.take on the map
    assert not mapped.pread
    grew_mapped, pairs = _touch(mapped)
    for ids, got in pairs[:3]:
        np.testing.assert_array_equal(got, want[ids])
    assert grew < 2 and grew_mapped > 8, (grew, grew_mapped)  # MiB
