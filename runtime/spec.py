"""The feature spec: which model inputs are user-side and which are candidate-side.

The spec is the contract shared by the exporter (capture, split) and the runtime
(request validation). It is plain data (YAML, JSON or a dict); see DESIGN.md.

    name: rankmixer_ugsep
    inputs:
      - {name: user_ids,  side: user,  dtype: int64,   shape: [16], vocab: 100000}
      - {name: item_ids,  side: group, dtype: int64,   shape: [8],  vocab: 100000}
      - {name: x, side: mixed, dtype: float32, shape: [9], columns: {user: [[0, 5]], group: [[5, 9]]}}
    outputs: [ctr]

``shape`` excludes the batch dimension (always dim 0). A dict-valued ``forward``
argument is addressed leaf by leaf as ``arg.key``. An input whose last dimension
mixes user and item columns is declared with ``columns`` (half-open ranges over the
last dimension) and gets ``side: mixed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.columns import ColumnField, parse_fields, ranges_of
from runtime.errors import SpecError

SIDES = ("user", "group", "mixed")
DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class InputSpec:
    """One model input (a leaf tensor) and the side it belongs to."""

    name: str
    side: str
    dtype: str
    shape: tuple[int, ...]
    vocab: int | None = None
    columns: dict[str, tuple[tuple[int, int], ...]] | None = None
    fields: tuple[ColumnField, ...] | None = None  # per-column layout (runtime.columns)

    @property
    def arg(self) -> str:
        """The ``forward`` argument this leaf belongs to (``user`` for ``user.ids``)."""
        return self.name.split(".", 1)[0]

    @property
    def key(self) -> str | None:
        """The dict key inside the argument, or None for a plain tensor argument."""
        parts = self.name.split(".", 1)
        return parts[1] if len(parts) == 2 else None

    @property
    def is_integer(self) -> bool:
        return self.dtype in ("int64", "int32")

    def user_columns(self) -> list[int]:
        """Column indices (last dim) that are user-side; all or nothing unless mixed."""
        if self.columns is None:
            return list(range(self.shape[-1] if self.shape else 1)) if self.side == "user" else []
        return [c for lo, hi in self.columns.get("user", ()) for c in range(lo, hi)]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "side": self.side,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if self.vocab is not None:
            d["vocab"] = self.vocab
        if self.fields is not None:
            d["columns"] = [f.to_dict() for f in self.fields]
        elif self.columns is not None:
            d["columns"] = {k: [list(r) for r in v] for k, v in self.columns.items()}
        return d


@dataclass(frozen=True)
class FeatureSpec:
    """The inputs of a model, split by side, and the names of its outputs."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def user_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.side == "user")

    @property
    def group_inputs(self) -> tuple[InputSpec, ...]:
        """Inputs that vary per candidate (``mixed`` inputs included: they carry item columns)."""
        return tuple(i for i in self.inputs if i.side in ("group", "mixed"))

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise SpecError(
            f"spec '{self.name}' has no input named '{name}'; "
            f"it has: {', '.join(i.name for i in self.inputs)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: Any) -> FeatureSpec:
        """Validate and build a spec from plain data; every problem is a SpecError."""
        if not isinstance(data, dict):
            raise SpecError(f"a feature spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"name", "inputs", "outputs"}
        if unknown:
            raise SpecError(f"feature spec has unknown keys {sorted(unknown)}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError("feature spec needs a non-empty string 'name'")
        raw_inputs = data.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise SpecError(f"feature spec '{name}' needs a non-empty list 'inputs'")
        inputs = tuple(_input_from_dict(name, i, raw) for i, raw in enumerate(raw_inputs))
        names = [i.name for i in inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"feature spec '{name}' declares inputs more than once: {dup}")
        _check_dict_args(name, inputs)
        if not any(i.side in ("group", "mixed") for i in inputs):
            raise SpecError(f"feature spec '{name}' has no group (candidate) input")
        outputs = data.get("outputs", ["score"])
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, str) and o for o in outputs)
        ):
            raise SpecError(f"feature spec '{name}': 'outputs' must be a non-empty list of names")
        if len(set(outputs)) != len(outputs):
            raise SpecError(f"feature spec '{name}': output names repeat: {outputs}")
        return cls(name=name, inputs=inputs, outputs=tuple(outputs))

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | FeatureSpec) -> FeatureSpec:
        """Load a spec from a YAML/JSON file, a dict, or pass a FeatureSpec through."""
        if isinstance(source, FeatureSpec):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"feature spec file '{path}' does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml  # only the exporter side reads YAML; the runtime gets JSON

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse failure is a spec error
            raise SpecError(f"cannot parse feature spec '{path}': {e}") from e
        return cls.from_dict(data)


def _input_from_dict(spec_name: str, index: int, raw: Any) -> InputSpec:
    where = f"feature spec '{spec_name}', inputs[{index}]"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "side", "dtype", "shape", "vocab", "columns"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        raise SpecError(f"{where}: 'name' must be a non-empty string like 'arg' or 'arg.key'")
    where = f"feature spec '{spec_name}', input '{name}'"
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        raise SpecError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    shape = raw.get("shape", [])
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise SpecError(
            f"{where}: 'shape' must be a list of positive ints (batch dim excluded), got {shape!r}"
        )
    vocab = raw.get("vocab")
    if vocab is not None:
        if not isinstance(vocab, int) or vocab <= 0:
            raise SpecError(f"{where}: 'vocab' must be a positive int, got {vocab!r}")
        if dtype not in ("int64", "int32"):
            raise SpecError(
                f"{where}: 'vocab' applies to integer ids, but dtype is {dtype} "
                "(ids stored in float columns: give each column its vocab under 'columns')"
            )
    fields = None
    if isinstance(raw.get("columns"), list):
        return _input_with_fields(where, name, raw, dtype, shape, vocab)
    columns = _parse_columns(where, raw.get("columns"), shape)
    side = raw.get("side", "mixed" if columns else None)
    if side not in SIDES:
        raise SpecError(f"{where}: side {side!r} is not one of user, group (or mixed with columns)")
    if (side == "mixed") != (columns is not None):
        raise SpecError(f"{where}: side 'mixed' and 'columns' go together")
    return InputSpec(name, side, dtype, tuple(shape), vocab, columns, fields)


def _input_with_fields(where, name, raw, dtype, shape, vocab) -> InputSpec:
    """An input declared column by column (runtime.columns): its side follows its fields."""
    if not shape:
        raise SpecError(f"{where}: 'columns' needs a shape with a last dimension")
    side = raw.get("side")
    fields = parse_fields(where, raw["columns"], shape[-1], side if side in ("user", "group") else None)
    sides = {f.side for f in fields}
    derived = sides.pop() if len(sides) == 1 else "mixed"
    if side is not None and side != derived:
        raise SpecError(f"{where}: side {side!r} disagrees with its columns, which are {derived}")
    columns = ranges_of(fields) if derived == "mixed" else None
    return InputSpec(name, derived, dtype, tuple(shape), vocab, columns, fields)


def _parse_columns(where: str, raw: Any, shape: list[int]):
    if raw is None:
        return None
    if not shape:
        raise SpecError(f"{where}: 'columns' needs a shape with a last dimension")
    if not isinstance(raw, dict) or set(raw) - {"user", "group"} or not raw:
        raise SpecError(f"{where}: 'columns' must map 'user'/'group' to lists of [start, end)")
    width = shape[-1]
    owner = [None] * width
    out = {}
    for side, ranges in raw.items():
        parsed = []
        for r in ranges:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and 0 <= r[0] < r[1] <= width):
                raise SpecError(f"{where}: column range {r!r} is not [start, end) within 0..{width}")
            for c in range(r[0], r[1]):
                if owner[c] is not None:
                    raise SpecError(f"{where}: column {c} is claimed by both {owner[c]} and {side}")
                owner[c] = side
            parsed.append((int(r[0]), int(r[1])))
        out[side] = tuple(parsed)
    missing = [c for c, o in enumerate(owner) if o is None]
    if missing:
        raise SpecError(f"{where}: columns {missing} belong to neither user nor group")
    return out


def _check_dict_args(spec_name: str, inputs: tuple[InputSpec, ...]) -> None:
    plain = {i.arg for i in inputs if i.key is None}
    dicts = {i.arg for i in inputs if i.key is not None}
    both = plain & dicts
    if both:
        raise SpecError(
            f"feature spec '{spec_name}': argument(s) {sorted(both)} are declared both as a "
            "tensor and as a dict of tensors ('arg.key')"
        )
