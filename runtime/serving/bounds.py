"""Bounds checked on a request before any work is spent on it.

A request body is bounded in bytes by the HTTP layer (``app.read_body``); these checks
bound what the bytes may ask for, so that no request can make the server allocate,
recurse or compute more than its size warrants:

- the JSON header's length (``max_json_bytes``: a JSON parse holds the GIL, so even on a
  worker thread a huge header would stall the event loop; big tensors go binary);
- its nesting depth, counted over the raw bytes before ``json.loads`` (a bracket inside a
  string counts too: the bound is an over-estimate, never an under-estimate);
- the length of every ``"shape": [...]`` list, found by a regular expression over the raw
  bytes before ``json.loads`` (a 120,000-entry shape is refused without being parsed);
- integers past Python's int-string limit (``json.loads`` refuses them; mapped to 400);
- each input's number of dims, and its element count against the spec (an input the
  model does not take is refused before its data is touched) and against the body size:
  every element costs at least one byte in either encoding, so a shape that claims more
  elements than the body has bytes is a lie, refused before any product is formed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import RequestError

MAX_DIMS = 32  # numpy's own limit is 64; a ranking input has a handful
MAX_DEPTH = MAX_DIMS + 8  # the tensor's nesting plus the envelope {"inputs": [{"data": ...}]}
MAX_SHAPE_BYTES = 1024  # 32 dims of up to 20 digits, with separators and spaces
_LONG_SHAPE = re.compile(rb'"shape"\s*:\s*\[[^\]]{%d}' % MAX_SHAPE_BYTES)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


class TooLargeError(RequestError):
    """A request (or a part of it) exceeds a size limit: HTTP 413."""


@dataclass
class ParseLimits:
    """What one infer request may contain; ``max_elements`` maps input name -> element bound
    (from the spec and the candidate limit); ``None`` skips the per-input check."""

    max_json_bytes: int = 1 << 20
    max_depth: int = MAX_DEPTH
    max_dims: int = MAX_DIMS
    max_elements: Mapping[str, int] | None = None
    max_rows: int | None = None  # the candidate limit behind max_elements (for messages)


def check_header_bytes(head: bytes | memoryview, limits: ParseLimits) -> None:
    """Size and nesting of the JSON header, from its raw bytes (vectorised, no parse)."""
    if len(head) > limits.max_json_bytes:
        raise TooLargeError(
            f"the JSON part of the request is {len(head)} bytes; the limit is {limits.max_json_bytes} "
            f"(send large tensors with the binary data extension, or raise --max-json-mb)"
        )
    raw = np.frombuffer(head, dtype=np.uint8)
    step = np.zeros(len(raw), dtype=np.int8)
    for c in _OPEN:
        step += raw == c
    for c in _CLOSE:
        step -= raw == c
    depth = int(np.cumsum(step, dtype=np.int32).max()) if len(raw) else 0
    if depth > limits.max_depth:
        raise RequestError(f"the request JSON nests {depth} levels deep; the limit is {limits.max_depth}")
    if _LONG_SHAPE.search(head):
        raise RequestError(f"a 'shape' list in the request is longer than {MAX_SHAPE_BYTES} bytes; "
                           f"an input has at most {limits.max_dims} dims")


def check_shape(name: str, shape: Any, body_len: int, limits: ParseLimits) -> int:
    """Validate ``shape`` (a list of non-negative ints) and return its element count.

    The count is bounded as it is formed (no huge products, no huge integers printed).
    """
    if not isinstance(shape, list):
        raise RequestError(f"input '{name}': 'shape' must be a list of non-negative integers, got {_short(shape)}")
    if len(shape) > limits.max_dims:
        raise RequestError(f"input '{name}': 'shape' has {len(shape)} dims; the limit is {limits.max_dims}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"input '{name}': 'shape' must be a list of non-negative integers, got {_short(shape)}")
    spec_bound = _spec_bound(name, limits)
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > spec_bound:
            raise RequestError(
                f"input '{name}': shape {_short(shape)} holds more than {spec_bound} elements; this bundle "
                f"accepts at most {limits.max_rows} candidates per request of the spec's shape"
            )
        if count > body_len:
            raise TooLargeError(
                f"input '{name}': shape {_short(shape)} claims more elements than the {body_len}-byte body holds"
            )
    return count


def _spec_bound(name: str, limits: ParseLimits) -> float:
    if limits.max_elements is None:
        return float("inf")
    if name not in limits.max_elements:
        raise RequestError(f"unknown input '{_short(name)}'; the model takes inputs {sorted(limits.max_elements)}")
    return limits.max_elements[name]


def _short(value: Any, limit: int = 80) -> str:
    """A bounded repr for error messages (a 120,000-dim shape stays one short line)."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(_short(v, 16) for v in value[:8])}, ... ({len(value)} entries)]"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
