"""Column layouts: one 2-D input whose last dim holds many fields (the CTR-library layout).

Libraries such as deepctr-torch feed one float tensor ``X`` of shape (B, C) whose
columns are id fields (each with its own vocabulary, ids stored as floats) and dense
values, user and candidate fields side by side. The spec describes each column run:

    - name: X
      dtype: float32
      shape: [5]
      columns:
        - {name: user_id,    side: user,  vocab: 50}
        - {name: user_age,   side: user,  vocab: 8}
        - {name: user_score, side: user}              # dense
        - {name: item_tags,  side: group, vocab: 60, width: 3}   # a bag: 3 id columns
        - {name: item_price, side: group}

``width`` (default 1) is how many consecutive columns the field takes. The older form
``columns: {user: [[0, 3]], group: [[3, 5]]}`` (ranges only, no vocabularies) is still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import SpecError


@dataclass(frozen=True)
class ColumnField:
    """A run of ``width`` columns starting at ``start``: ids (with ``vocab``) or dense values."""

    name: str
    side: str
    start: int
    width: int = 1
    vocab: int | None = None

    @property
    def stop(self) -> int:
        return self.start + self.width

    @property
    def is_id(self) -> bool:
        return self.vocab is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "side": self.side}
        if self.width != 1:
            d["width"] = self.width
        if self.vocab is not None:
            d["vocab"] = self.vocab
        return d


def parse_fields(where: str, raw: list, width: int, default_side: str | None) -> tuple[ColumnField, ...]:
    """The list form of ``columns``: consecutive fields covering the last dim exactly."""
    fields: list[ColumnField] = []
    start = 0
    for i, f in enumerate(raw):
        at = f"{where}, columns[{i}]"
        if not isinstance(f, dict) or set(f) - {"name", "side", "vocab", "width"}:
            raise SpecError(f"{at}: expected a mapping with name, side, and optional vocab, width")
        name, side = f.get("name", f"col{start}"), f.get("side", default_side)
        if side not in ("user", "group"):
            raise SpecError(f"{at} ('{name}'): side {side!r} is not user or group")
        w, vocab = f.get("width", 1), f.get("vocab")
        if not isinstance(w, int) or w <= 0:
            raise SpecError(f"{at} ('{name}'): 'width' must be a positive int, got {w!r}")
        if vocab is not None and (not isinstance(vocab, int) or vocab <= 0):
            raise SpecError(f"{at} ('{name}'): 'vocab' must be a positive int, got {vocab!r}")
        fields.append(ColumnField(str(name), side, start, w, vocab))
        start += w
    if start != width:
        raise SpecError(f"{where}: the columns' widths add up to {start}; the last dim is {width}")
    return tuple(fields)


def ranges_of(fields: tuple[ColumnField, ...]) -> dict[str, tuple[tuple[int, int], ...]]:
    """Per side, the merged half-open column ranges (the older ``columns`` form)."""
    out: dict[str, list[list[int]]] = {}
    for f in fields:
        runs = out.setdefault(f.side, [])
        if runs and runs[-1][1] == f.start:
            runs[-1][1] = f.stop
        else:
            runs.append([f.start, f.stop])
    return {side: tuple((lo, hi) for lo, hi in runs) for side, runs in out.items()}


def field_at(fields: tuple[ColumnField, ...] | None, column: int) -> ColumnField | None:
    """The field holding ``column`` (None without a field list)."""
    for f in fields or ():
        if f.start <= column < f.stop:
            return f
    return None
