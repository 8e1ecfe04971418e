"""Options that carry their own CLI flags (in the spirit of Polygraphy's argument groups).

A step's options are a dataclass of ``StepOptions`` whose fields are declared with ``arg``:
the field's type and default, and its flag and help line, in one place.

    @dataclass
    class ThreadsOptions(StepOptions):
        enabled: bool = arg("--no-stage-threads", default=True, action="store_false",
                            help="do not time the small-batch stages on fewer threads")

``ThreadsOptions.add_arguments(parser)`` adds the flags; ``ThreadsOptions.from_args(args)``
builds the options from what was parsed. Fields without ``arg`` have no flag (composed
options, or values the command computes, e.g. the loaded --data rows).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any


def arg(*flags: str, default: Any, help: str, convert: Callable[[Any], Any] | None = None,
        **argparse_kw: Any) -> Any:
    """A dataclass field with its flag: ``argparse_kw`` go to ``add_argument`` (type, choices,
    nargs, action, metavar); ``convert`` turns the parsed value into the field's type."""
    meta = {"flags": flags, "help": help, "convert": convert, "kw": argparse_kw}
    if isinstance(default, list | dict | set):
        raise TypeError("arg(): use an immutable default (a tuple)")
    return dataclasses.field(default=default, metadata={"arg": meta})


def as_tuple(value: Any) -> tuple | None:
    """``convert`` for nargs flags: the parsed list as a tuple (None stays None)."""
    return None if value is None else tuple(value)


class StepOptions:
    """Mixin of an options dataclass whose fields are declared with ``arg``."""

    @classmethod
    def _flagged(cls) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
        return [(f, f.metadata["arg"]) for f in dataclasses.fields(cls) if "arg" in f.metadata]

    @classmethod
    def _dest(cls, f: dataclasses.Field) -> str:
        return f"{cls.__name__}.{f.name}"

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """One flag per ``arg`` field, with the field's default."""
        for f, meta in cls._flagged():
            kw = dict(meta["kw"])
            if kw.get("action") not in ("store_true", "store_false"):
                kw.setdefault("metavar", f.name.upper())
                if "choices" in kw and kw.get("nargs") is None:
                    kw.pop("metavar")  # argparse shows {a,b,c}
            p.add_argument(*meta["flags"], dest=cls._dest(f), default=f.default, help=meta["help"], **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any):
        """The options parsed into ``args`` (plus ``values`` for fields without a flag)."""
        for f, meta in cls._flagged():
            value = getattr(args, cls._dest(f))
            values[f.name] = meta["convert"](value) if meta["convert"] else value
        return cls(**values)


def positive_int(value: str, expected: str = "an integer > 0") -> int:
    """An argparse ``type``: an int > 0, else a one-line usage error naming ``expected``."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return n
