"""Which model factories a checkpoint may name, and resolving them without running untrusted code.

A checkpoint's ``config.json`` (and a bundle manifest's ``source``) names the callable that
rebuilds the model as ``package.module:callable``. Those files are data a user may have been
handed, so a name read from them is resolved only when both hold:

1. its module is **trusted**: the module, or a package above it, was named by the user
   (``--trust-module PKG`` on the command line, ``trust=("PKG",)`` in the Python API).
   The project's own ``students`` package is trusted by default. This is decided from the
   name alone, before anything is imported: an untrusted name imports and runs nothing.
2. the callable is a **registered model factory**: decorated with :func:`model_factory`
   (equivalently, it carries ``__ugsep_model_factory__ = True`` in its own ``__dict__``,
   so a subclass of a registered class is not registered by inheritance), or declared in
   the ``ugsep.models`` entry-point group of an installed distribution. An arbitrary
   attribute of a trusted module (``os.system`` re-exported, a helper) is refused.

The same rule covers ``--factory`` given on the command line: naming it there trusts its
module, and it still has to be a registered factory.
"""

from __future__ import annotations

import importlib
import keyword
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from exporter.errors import ExportError

__all__ = [
    "DEFAULT_TRUSTED",
    "ENTRY_POINT_GROUP",
    "MARKER",
    "Trust",
    "UntrustedFactoryError",
    "model_factory",
    "resolve_factory",
]

DEFAULT_TRUSTED = ("students",)
ENTRY_POINT_GROUP = "ugsep.models"
MARKER = "__ugsep_model_factory__"

F = TypeVar("F", bound=Callable[..., Any])


class UntrustedFactoryError(ExportError):
    """A file named a factory the user has not trusted; nothing was imported or run."""


def model_factory(fn: F) -> F:
    """Register ``fn`` (a function or an ``nn.Module`` class) as a model factory.

    Only registered factories can be named by a checkpoint's ``config.json``; the module
    they live in must still be trusted (``--trust-module``).
    """
    setattr(fn, MARKER, True)
    return fn


@dataclass(frozen=True)
class Trust:
    """The module prefixes a user trusts to provide model factories."""

    modules: tuple[str, ...] = DEFAULT_TRUSTED

    @classmethod
    def of(cls, extra: Iterable[str] | Trust | None = None) -> Trust:
        """The default trust plus ``extra`` module names (a ``Trust`` passes through)."""
        if isinstance(extra, Trust):
            return extra
        names = list(DEFAULT_TRUSTED)
        for name in extra or ():
            name = name.strip()
            if not _is_dotted_name(name):
                raise ExportError(
                    f"--trust-module {name!r} is not a module name (expected e.g. 'mypkg' "
                    "or 'mypkg.models')"
                )
            names.append(name)
        return cls(tuple(dict.fromkeys(names)))

    def with_module(self, name: str) -> Trust:
        return Trust(tuple(dict.fromkeys([*self.modules, name])))

    def trusts(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.modules)


def resolve_factory(ref: str, trust: Trust, *, named_by: str) -> Callable[..., Any]:
    """The registered factory ``ref`` names, or a one-line error; imports only trusted modules.

    ``named_by`` says where the name came from ("'ckpt/config.json'", "the command line"),
    for the error message.
    """
    module_name, attr = _parse(ref, named_by)
    if not trust.trusts(module_name):
        raise UntrustedFactoryError(
            f"factory '{ref}' named by {named_by} is in module '{module_name}', which is not "
            f"trusted (trusted: {', '.join(trust.modules)}); nothing was imported. If you "
            f"trust that code, pass --trust-module {module_name.split('.')[0]} "
            "(trust=(...) in the Python API)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExportError(f"cannot import module '{module_name}' for factory '{ref}': {e}") from e
    obj = vars(module).get(attr)
    if obj is None:
        raise ExportError(f"module '{module_name}' has no attribute '{attr}' (factory '{ref}')")
    if not _is_registered(obj, ref):
        raise UntrustedFactoryError(
            f"'{ref}' named by {named_by} is not a registered model factory: decorate it with "
            f"@exporter.trust.model_factory or declare it in the '{ENTRY_POINT_GROUP}' "
            "entry-point group; nothing was called"
        )
    return obj


def _parse(ref: Any, named_by: str) -> tuple[str, str]:
    if not isinstance(ref, str):
        raise ExportError(f"factory named by {named_by} must be a string, found {ref!r}")
    module_name, sep, attr = ref.partition(":")
    if not sep or not _is_dotted_name(module_name) or not attr.isidentifier():
        raise ExportError(
            f"factory '{ref}' named by {named_by} must look like 'package.module:callable' "
            "(one attribute name after the colon)"
        )
    return module_name, attr


def _is_dotted_name(name: str) -> bool:
    parts = name.split(".")
    return bool(name) and all(p.isidentifier() and not keyword.iskeyword(p) for p in parts)


def _is_registered(obj: Any, ref: str) -> bool:
    if callable(obj) and getattr(obj, "__dict__", {}).get(MARKER) is True:
        return True
    return callable(obj) and ref in _entry_point_refs()


def _entry_point_refs() -> set[str]:
    """``module:attr`` values declared in the ``ugsep.models`` group (read from metadata only)."""
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - broken metadata of an unrelated package: no entries
        return set()
    return {ep.value.replace(" ", "") for ep in eps}
