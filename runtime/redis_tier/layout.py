"""What a pushed version looks like in Redis Cluster: tables, row bytes, key names.

Key layout (``V`` = the store's content hash, the version; ``T`` = a table name)::

    ugsep:{V}:meta        string  JSON: format, tables [{name, rows, dim, dtype, buckets,
                                  tags}]; written FIRST by a push
    ugsep:{V}:progress    hash    "<T>/<chunk>" -> "1" for every chunk of rows written
                                  (what a resumed push skips)
    ugsep:{V}:done        string  JSON summary; written LAST: the version is complete
    ugsep:{<tag>}         hash    one bucket of table T: field = row id (decimal ASCII),
                                  value = the row's raw bytes in the stored dtype

Row ``i`` of table ``T`` lives in bucket ``i % buckets``. Each bucket's hash tag is
``V/T/b`` plus a short salt chosen so that bucket ``b`` of ``B`` hashes into slot range
``[b*16384/B, (b+1)*16384/B)``: the buckets of a table spread evenly over the slot ranges
that ``redis-cli --cluster create`` hands the masters, and a batch of ids needs at most
``B`` HMGETs (one per bucket it touches) grouped into one pipeline per node.

Row bytes: float32 -> ``dim*4`` bytes, float16 -> ``dim*2``; int8 -> ``dim`` uint8 codes,
then the row's float32 scale and float32 bias (FBGEMM's fused 8-bit row-wise layout,
value = code * scale + bias).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import BundleError

KEY_PREFIX = "ugsep"
FORMAT = 1
DTYPES = ("float32", "float16", "int8")
SLOTS = 16384
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def check_name(kind: str, name: str) -> str:
    """Versions and table names go into keys: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BundleError(f"{kind} {name!r} cannot name a Redis key: use 1-128 of [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True)
class TableLayout:
    """One table as the tier stores it: shape, stored dtype and bucket hash tags."""

    name: str
    rows: int
    dim: int
    dtype: str
    buckets: int = 0
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name("table", self.name)
        if self.dtype not in DTYPES:
            raise BundleError(f"table '{self.name}': dtype {self.dtype!r} is not one of {DTYPES}")
        if self.rows < 1 or self.dim < 1:
            raise BundleError(f"table '{self.name}': needs rows >= 1 and dim >= 1, got {self.rows} x {self.dim}")

    @property
    def row_nbytes(self) -> int:
        """Bytes of one stored row (int8: codes + float32 scale + float32 bias)."""
        return self.dim * {"float32": 4, "float16": 2, "int8": 1}[self.dtype] + (8 if self.dtype == "int8" else 0)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_nbytes

    def same_table(self, other: TableLayout) -> bool:
        """Same rows, dim and stored dtype (bucketing may differ between pushes)."""
        return (self.name, self.rows, self.dim, self.dtype) == (other.name, other.rows, other.dim, other.dtype)


def default_buckets(layout: TableLayout, max_bucket_bytes: int = 64 << 20) -> int:
    """Power of two >= 16 so that one bucket (one Redis hash) holds at most ~64 MiB.

    Fewer buckets mean fewer commands per lookup (one per bucket touched); 16 evenly spread
    tags still split a table over three masters within one bucket (6 %) of even."""
    b = 16
    while b < SLOTS and layout.nbytes / b > max_bucket_bytes:
        b *= 2
    return b


def bucket_tags(version: str, table: str, buckets: int) -> tuple[str, ...]:
    """Hash tags whose slots spread evenly: bucket b hashes into [b*S/B, (b+1)*S/B)."""
    from redis.crc import key_slot

    tags = []
    for b in range(buckets):
        lo, hi = b * SLOTS // buckets, (b + 1) * SLOTS // buckets
        salt = 0
        while not lo <= key_slot(f"{version}/{table}/{b}.{salt}".encode()) < hi:
            salt += 1
        tags.append(f"{version}/{table}/{b}.{salt}")
    return tuple(tags)


def with_buckets(layout: TableLayout, version: str, buckets: int | None = None) -> TableLayout:
    """The layout with its bucket count and hash tags for ``version``."""
    b = int(buckets or default_buckets(layout))
    if not 1 <= b <= SLOTS:
        raise BundleError(f"table '{layout.name}': buckets must be in [1, {SLOTS}], got {b}")
    return TableLayout(layout.name, layout.rows, layout.dim, layout.dtype, b, bucket_tags(version, layout.name, b))


def meta_key(version: str) -> str:
    return f"{KEY_PREFIX}:{{{version}}}:meta"


def progress_key(version: str) -> str:
    return f"{KEY_PREFIX}:{{{version}}}:progress"


def done_key(version: str) -> str:
    return f"{KEY_PREFIX}:{{{version}}}:done"


def bucket_key(layout: TableLayout, bucket: int) -> str:
    return f"{KEY_PREFIX}:{{{layout.tags[bucket]}}}"


def version_of_meta_key(key: str) -> str:
    """``ugsep:{V}:meta`` -> ``V``."""
    return key[len(KEY_PREFIX) + 2 : -len("}:meta")]


def encode_meta(version: str, layouts: list[TableLayout]) -> str:
    tables = [dict(asdict(t), tags=list(t.tags)) for t in layouts]
    return json.dumps({"format": FORMAT, "version": version, "tables": tables}, sort_keys=True)


def decode_meta(raw: bytes | str, where: str) -> dict[str, TableLayout]:
    """Parse a meta key's JSON into layouts by table name, refusing unknown formats."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise BundleError(f"{where}: meta format {doc.get('format')!r}, this ugsep reads {FORMAT}")
        tables = [TableLayout(**dict(t, tags=tuple(t["tags"]))) for t in doc["tables"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{where}: unreadable meta key ({e})") from e
    return {t.name: t for t in tables}


def decode_rows(layout: TableLayout, raw: np.ndarray) -> np.ndarray:
    """Raw stored rows ``uint8 [n, row_nbytes]`` -> float32 ``[n, dim]`` (int8 dequantised)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n, d = raw.shape[0], layout.dim
    if layout.dtype == "float32":
        return raw.view(np.float32).reshape(n, d)
    if layout.dtype == "float16":
        return raw.view(np.float16).reshape(n, d).astype(np.float32)
    scale_bias = np.ascontiguousarray(raw[:, d:]).view(np.float32)  # [n, 2]
    return raw[:, :d].astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]
