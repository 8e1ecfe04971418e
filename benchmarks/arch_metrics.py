"""Architecture metrics of the tree (issue 19): what the layout and the option plumbing cost.

    python benchmarks/arch_metrics.py                  # this tree -> benchmarks/results/arch_metrics.json
    python benchmarks/arch_metrics.py --root DIR --label before --out FILE   # another checkout

Measured from the source (ast) and runtime.manifest's annotations, no timing:

    manifest_untyped_sections  fields of runtime.manifest.Manifest annotated dict[str, Any]
    extra_keys                 distinct keys passed through ExportOptions.extra (set or read:
                               ``ExportOptions(extra={...})``, ``options.extra.get("k")``,
                               ``extra["k"]`` on an alias of it, a dict literal named ``extra``
                               handed to ExportOptions)
    largest_module             the longest .py file under exporter/, graph_passes/, runtime/
    functions_over_60          functions (methods, nested functions too) longer than 60 lines
    exporter_import_floors     exporter's units (a step, exporter.evaluate, a command, a top-level
                               module) layered by their module-level imports of each other
                               (floor 0 imports no other unit; TYPE_CHECKING and function-level
                               imports do not count): the number of floors; ``module_floors``:
                               the same per .py file

Runs in a few seconds; the only import is runtime.manifest of the measured tree (in a
subprocess, so two trees can be measured from one interpreter).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("exporter", "graph_passes", "runtime")
EXTRA_SCAN = ("exporter", "tests", "benchmarks", "students")
LONG = 60


def py_files(root: Path, packages) -> list[Path]:
    out = []
    for pkg in packages:
        out += [p for p in sorted((root / pkg).rglob("*.py")) if ".venv" not in p.parts]
    return out


def manifest_untyped(root: Path) -> dict:
    code = (
        "import dataclasses, json, typing\n"
        "from runtime.manifest import Manifest\n"
        "hints = {f.name: str(f.type) for f in dataclasses.fields(Manifest)}\n"
        "print(json.dumps(hints))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=root, check=True)
    hints = json.loads(res.stdout)
    untyped = sorted(n for n, t in hints.items() if t.replace(" ", "").startswith("dict[str,Any]"))
    return {"count": len(untyped), "fields": untyped, "of": len(hints)}


def _const(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_extra_expr(node, aliases: set[str]) -> bool:
    """``<x>.options.extra`` / ``o.extra`` / ``options.extra`` (or ``... or {}``), or an alias."""
    if isinstance(node, ast.BoolOp):
        return any(_is_extra_expr(v, aliases) for v in node.values)
    if isinstance(node, ast.Name):
        return node.id in aliases
    if isinstance(node, ast.Attribute) and node.attr == "extra":
        base = ast.unparse(node.value)
        return base.endswith("options") or base in ("o", "opts")
    return False


def extra_keys(root: Path) -> dict:
    """Keys of ExportOptions.extra: written at construction and read by the steps."""
    keys: dict[str, set[str]] = {}

    def add(key: str | None, where: Path) -> None:
        if key:
            keys.setdefault(key, set()).add(str(where.relative_to(root)))

    for f in py_files(root, EXTRA_SCAN):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for fn in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
            aliases = {"extra"} if any(
                isinstance(a, ast.arg) and a.arg == "extra" and a.annotation is not None
                and "dict" in ast.unparse(a.annotation)
                for a in getattr(getattr(fn, "args", None), "args", [])
            ) else set()
            extra_dicts: dict[str, ast.Dict] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    if _is_extra_expr(node.value, aliases):
                        aliases.add(node.targets[0].id)
                    elif isinstance(node.value, ast.Dict):
                        extra_dicts[node.targets[0].id] = node.value
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func).split(".")[-1]
                    if name == "ExportOptions":
                        for kw in node.keywords:
                            if kw.arg != "extra":
                                continue
                            d = kw.value if isinstance(kw.value, ast.Dict) else (
                                extra_dicts.get(kw.value.id) if isinstance(kw.value, ast.Name) else None)
                            for k in (d.keys if d is not None else []):
                                add(_const(k), f)
                    if (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                            and _is_extra_expr(node.func.value, aliases) and node.args):
                        add(_const(node.args[0]), f)
                elif isinstance(node, ast.Subscript) and _is_extra_expr(node.value, aliases):
                    add(_const(node.slice), f)
                elif (isinstance(node, ast.Compare) and len(node.ops) == 1
                      and isinstance(node.ops[0], ast.In) and _is_extra_expr(node.comparators[0], aliases)):
                    add(_const(node.left), f)
                elif isinstance(node, ast.comprehension) and _is_extra_expr(node.iter, aliases):
                    pass
            # {k: ctx.options.extra[k] for k in ("external_data_bytes",) if k in ...}
            for node in ast.walk(fn):
                if isinstance(node, ast.DictComp | ast.ListComp | ast.SetComp | ast.GeneratorExp):
                    uses = any(_is_extra_expr(n, aliases) for n in ast.walk(node))
                    for gen in node.generators if uses else []:
                        if isinstance(gen.iter, ast.Tuple | ast.List):
                            for elt in gen.iter.elts:
                                add(_const(elt), f)
    return {"count": len(keys), "keys": {k: sorted(v) for k, v in sorted(keys.items())}}


def largest_module(root: Path) -> dict:
    sizes = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines())
             for p in py_files(root, PACKAGES)}
    name = max(sizes, key=sizes.get)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    return {"name": name, "lines": sizes[name], "top5": dict(top)}


def long_functions(root: Path) -> dict:
    found = []
    for f in py_files(root, PACKAGES):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > LONG:
                    found.append((str(f.relative_to(root)), node.name, n))
    by_pkg = {pkg: sum(1 for p, _, _ in found if p.startswith(pkg + "/")) for pkg in PACKAGES}
    return {"count": len(found), "by_package": by_pkg,
            "functions": [f"{p}:{name} ({n})" for p, name, n in sorted(found)]}


def _module_name(root: Path, f: Path) -> str:
    parts = list(f.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_pkg: bool) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        stmts = [node] if isinstance(node, ast.Import | ast.ImportFrom) else (
            [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
            if isinstance(node, ast.Try | ast.If) else [])
        for s in stmts:
            if isinstance(s, ast.Import):
                out.update(a.name for a in s.names)
            else:
                base = s.module or ""
                if s.level:
                    parts = module.split(".")[: len(module.split(".")) - s.level + is_pkg]
                    base = ".".join(parts + ([base] if base else []))
                out.add(base)
                out.update(f"{base}.{a.name}" for a in s.names)
    return out


def import_floors(root: Path) -> dict:
    files = py_files(root, ("exporter",))
    modules = {_module_name(root, f): f for f in files}
    deps: dict[str, set[str]] = {}
    for m, f in modules.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        names = _top_level_imports(tree, m, f.name == "__init__.py")
        found = set()
        for n in names:
            parts = n.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__, a/b/__init__, a/b/c
                cand = ".".join(parts[:i])
                if cand in modules and cand != m and cand != "exporter":
                    found.add(cand)
        deps[m] = found
    by_module = _layers(deps)
    units = {m: _unit(m) for m in modules}
    unit_deps: dict[str, set[str]] = {}
    for m, ds in deps.items():
        unit_deps.setdefault(units[m], set()).update(units[d] for d in ds if units[d] != units[m])
    by_unit = _layers(unit_deps)
    return {
        "count": len(by_unit), "units": len(unit_deps), "floors": by_unit,
        "module_floors": len(by_module), "modules": len(modules),
    }


def _unit(module: str) -> str:
    """What a reader sees as one piece: a step (exporter.steps.quantize.*), the evaluate
    floor, a command, or a top-level exporter module."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] in ("steps", "commands"):
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _layers(deps: dict[str, set[str]]) -> dict[int, list[str]]:
    """Floor of each node: 0 imports nothing here, else 1 + the highest floor it imports."""
    floor: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(m: str) -> int:
        if m in floor:
            return floor[m]
        if m in visiting:  # a cycle: counted once
            return 0
        visiting.add(m)
        floor[m] = 1 + max((depth(d) for d in deps.get(m, ())), default=-1)
        visiting.discard(m)
        return floor[m]

    for m in deps:
        depth(m)
    n = max(floor.values()) + 1
    return {i: sorted(m for m, v in floor.items() if v == i) for i in range(n)}


def measure(root: Path) -> dict:
    return {
        "manifest_untyped_sections": manifest_untyped(root),
        "extra_keys": extra_keys(root),
        "largest_module": largest_module(root),
        "functions_over_60": long_functions(root),
        "exporter_import_floors": import_floors(root),
    }


def _commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(HERE.parent), help="tree to measure (default: this one)")
    ap.add_argument("--label", default="after", help="name of this measurement in the JSON")
    ap.add_argument("--out", default=str(HERE / "results" / "arch_metrics.json"),
                    help="JSON file; an existing one keeps its other labels")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    result = {"commit": _commit(root), **measure(root)}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc[args.label] = result
    doc["loadavg"] = list(os.getloadavg())  # no timing here; kept as the other benches do
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.label} ({result['commit']}):")
    print(f"  manifest dict[str, Any] sections: {result['manifest_untyped_sections']['count']}"
          f" of {result['manifest_untyped_sections']['of']} fields")
    print(f"  ExportOptions.extra keys:         {result['extra_keys']['count']}")
    lm = result["largest_module"]
    print(f"  largest module:                   {lm['name']} ({lm['lines']} lines)")
    fo = result["functions_over_60"]
    print(f"  functions over {LONG} lines:          {fo['count']} {fo['by_package']}")
    fl = result["exporter_import_floors"]
    print(f"  exporter import floors:           {fl['count']} ({fl['units']} units; "
          f"per module {fl['module_floors']}, {fl['modules']} modules)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
