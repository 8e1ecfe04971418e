"""The typed-section machinery of the manifest: JSON kinds and the ``Section`` base class.

A section is a dataclass whose fields carry a *kind* (``field_(INT_POS)``): ``from_dict``
checks every value against its kind and raises ``BundleError`` naming the file and the
field path (``…/manifest.json: stages.group.intra_op_threads: expected an int >= 1, got
'x'``); ``to_dict`` writes the JSON back. A section read from disk remembers which keys it
had and in which order, and keeps keys this runtime does not know in ``extra``, so
``to_dict(from_dict(x)) == x`` holds key for key (a signature covers the bytes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from runtime.errors import BundleError


@dataclass(frozen=True)
class At:
    """Where a value sits: the manifest file and the field path inside it."""

    file: str
    path: str

    def __truediv__(self, key: str | int) -> At:
        if isinstance(key, int):
            return At(self.file, f"{self.path}[{key}]")
        return At(self.file, f"{self.path}.{key}" if self.path else key)

    def error(self, problem: str) -> BundleError:
        return BundleError(f"{self.file}: {self.path}: {problem}")

    def expected(self, what: str, value: Any) -> BundleError:
        """``what`` is "an int >= 1" (-> "expected an int >= 1, got 'x'") or a sentence that
        starts with "needs" (a field with its own reason)."""
        shown = repr(value)
        lead = what if what.startswith("needs") else f"expected {what}"
        return self.error(f"{lead}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


class Kind:
    """The type of one JSON value: ``load`` checks (and converts), ``dump`` writes back."""

    what = "a value"

    def check(self, v: Any) -> bool:
        return True

    def load(self, v: Any, at: At) -> Any:
        if not self.check(v):
            raise at.expected(self.what, v)
        return v

    def dump(self, v: Any) -> Any:
        return v


class Scalar(Kind):
    """A JSON number, string or bool of ``types`` (a bool is never an int), >= ``minimum``."""

    def __init__(self, types: tuple[type, ...], what: str, minimum: int | None = None) -> None:
        self.types, self.what, self.minimum = types, what, minimum

    def check(self, v: Any) -> bool:
        if isinstance(v, bool) and bool not in self.types:
            return False
        return isinstance(v, self.types) and (self.minimum is None or v >= self.minimum)


class OneOf(Kind):
    def __init__(self, *values: Any) -> None:
        self.values = values
        self.what = "one of " + ", ".join(map(repr, values))

    def check(self, v: Any) -> bool:
        return isinstance(v, str | None) and v in self.values


class Nullable(Kind):
    def __init__(self, kind: Kind) -> None:
        self.kind, self.what = kind, f"{kind.what} or null"

    def load(self, v: Any, at: At) -> Any:
        if v is None:
            return None
        if isinstance(self.kind, Scalar | OneOf) and not self.kind.check(v):
            raise at.expected(self.what, v)  # "expected an int or null"
        return self.kind.load(v, at)

    def dump(self, v: Any) -> Any:
        return None if v is None else self.kind.dump(v)


class ListOf(Kind):
    def __init__(self, kind: Kind) -> None:
        self.kind, self.what = kind, f"a list of {kind.what.removeprefix('a ').removeprefix('an ')}"

    def load(self, v: Any, at: At) -> list:
        if not isinstance(v, list):
            raise at.expected(self.what, v)
        return [self.kind.load(x, at / i) for i, x in enumerate(v)]

    def dump(self, v: list) -> list:
        return [self.kind.dump(x) for x in v]


class MapOf(Kind):
    """A JSON object with free keys (stage names, file paths), each value of one kind."""

    def __init__(self, kind: Kind, keys: tuple[str, ...] | None = None) -> None:
        self.kind, self.keys = kind, keys
        self.what = "an object" + (f" keyed by {', '.join(keys)}" if keys else "")

    def load(self, v: Any, at: At) -> dict:
        if not isinstance(v, dict):
            raise at.expected(self.what, v)
        for k in v:
            if self.keys is not None and k not in self.keys:
                raise (at / k).error(f"unknown key (expected one of {', '.join(self.keys)})")
        return {k: self.kind.load(x, at / k) for k, x in v.items()}

    def dump(self, v: dict) -> dict:
        return {k: self.kind.dump(x) for k, x in v.items()}


class Sub(Kind):
    """A nested section."""

    def __init__(self, cls: type[Section]) -> None:
        self.cls, self.what = cls, "an object"

    def load(self, v: Any, at: At) -> Section:
        return self.cls.from_dict(v, at.file, at.path)

    def dump(self, v: Section) -> dict:
        return v.to_dict()


INT = Scalar((int,), "an int")
INT_POS = Scalar((int,), "an int >= 1", minimum=1)
INT_NONNEG = Scalar((int,), "an int >= 0", minimum=0)
NUM = Scalar((int, float), "a number")
STR = Scalar((str,), "a string")
BOOL = Scalar((bool,), "true or false")
OBJECT = Scalar((dict,), "an object")  # an opaque report: any JSON object, never read by field
ANY = Kind()  # any JSON value (an opaque report)


def field_(kind: Kind, *, required: bool = False, omit_none: bool = False, default: Any = None,
           factory: Any = None) -> Any:
    """A section field of ``kind``. ``required``: the key must be on disk. ``omit_none``: the
    key is left out of a new section's JSON while its value is None (keys present only
    sometimes, e.g. a stage's ``max_rows``)."""
    meta = {"kind": kind, "required": required, "omit_none": omit_none}
    if required:
        return dataclasses.field(metadata=meta)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Section:
    """Base of every manifest section (see the module doc)."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    _keys: tuple[str, ...] | None = dataclasses.field(default=None, repr=False, compare=False)

    NAME: ClassVar[str] = ""

    @classmethod
    def typed_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest", path: str | None = None) -> Any:
        at = At(where, cls.NAME if path is None else path)
        if not isinstance(d, dict):
            raise at.expected("an object", d)
        values = {}
        for f in cls.typed_fields():
            if f.name in d:
                values[f.name] = f.metadata["kind"].load(d[f.name], at / f.name)
            elif f.metadata["required"]:
                raise (at / f.name).error("required field is missing")
        known = {f.name for f in cls.typed_fields()}
        out = cls(**values, extra={k: v for k, v in d.items() if k not in known}, _keys=tuple(d))
        out.validate(at)
        return out

    def validate(self, at: At) -> None:
        """Checks across fields (after each field was checked alone); raise ``at.error``."""

    def omitted(self) -> set[str]:
        """Keys a new section leaves out of its JSON beyond its None ``omit_none`` fields."""
        return set()

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: f for f in self.typed_fields()}
        order = list(self._keys or ()) + [k for k in [*fields, *self.extra] if k not in (self._keys or ())]
        out: dict[str, Any] = {}
        skip = self.omitted() if self._keys is None else set()
        for key in order:
            f = fields.get(key)
            if f is None:
                if key in self.extra:
                    out[key] = self.extra[key]
                continue
            value = getattr(self, key)
            on_disk = self._keys is not None and key in self._keys  # written back as read
            if not on_disk and (key in skip or (value is None and f.metadata["omit_none"])):
                continue
            if not on_disk and self._keys is not None and value == _default(f):
                continue  # absent on disk and still its default: stays absent
            out[key] = f.metadata["kind"].dump(value)
        return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
