"""The UG split as export artifacts: user.onnx, group.onnx and the manifest's split record.

    art = split_to_onnx(program, spec)            # program: the captured ExportedProgram
    art.is_split                                  # False: nothing hoistable (see art.report)
    art.user, art.group                           # onnx.ModelProto, dynamic M and N
    art.manifest_split()                          # {"boundary": [...], "user_index": ..., "report": ...}
    art.flops                                     # {"full_per_row", "user_per_row", "group_per_row"}

Each side is a GraphModule (graph_passes.fx.SplitUserGroupPass), re-captured with
torch.export (dynamic dims M for users, N for candidates) and converted with the same
ONNX build as full.onnx, so I/O names are the contract names: spec names, boundary
names, ``user_index``, spec outputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from exporter.errors import ExportError
from exporter.steps.capture import MAX_BATCH, example_rows
from exporter.steps.onnx_build import export_onnx
from graph_passes.fx import USER_INDEX, SplitResult, SplitUserGroupPass
from runtime.manifest import Flops, RowScope, Split
from runtime.spec import FeatureSpec

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)
EXAMPLE_USERS, EXAMPLE_CANDIDATES = 2, 5  # distinct and > 1: no 0/1 or M == N specialisation


@dataclass
class SplitArtifacts:
    """The split's outputs: ONNX protos (None when not split), boundary, report, FLOPs."""

    result: SplitResult
    user: onnx.ModelProto | None = None
    group: onnx.ModelProto | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def is_split(self) -> bool:
        return self.user is not None

    @property
    def report(self) -> dict[str, Any]:
        return self.result.report

    @property
    def boundary(self) -> list[dict[str, Any]]:
        """[{"name", "dtype", "shape", "source"}] (source = module path that produced it)."""
        return [
            {k: b[k] for k in ("name", "dtype", "shape", "source")} for b in self.result.boundary
        ]

    @property
    def flops(self) -> dict[str, int]:
        f = self.report["flops"]
        return {k: int(f[k]) for k in ("full_per_row", "user_per_row", "group_per_row")}

    def manifest_split(self) -> dict[str, Any] | None:
        """The manifest's ``split`` record, or None when nothing was split."""
        if not self.is_split:
            return None
        return {
            "boundary": self.boundary,
            "user_index": USER_INDEX,
            "report": _jsonable(self.report),
        }


def split_to_onnx(
    program: torch.export.ExportedProgram,
    spec: FeatureSpec,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    rows: dict[str, np.ndarray] | None = None,
) -> SplitArtifacts:
    """Split ``program`` by ``spec`` and build user/group ONNX; write them when ``out_dir``.

    ``rows`` (spec-named arrays, >= 5 rows) are valid example inputs for re-capturing
    each side; by default rows are sampled from the spec.
    """
    result: SplitResult = SplitUserGroupPass(spec).call(program).graph_module
    art = SplitArtifacts(result)
    if not result.is_split:
        log.warning("no UG split for '%s': %s", spec.name, result.report.get("reason"))
        return art
    users = _example(spec, result.user_inputs, EXAMPLE_USERS, seed, rows)
    cands = _example(
        spec,
        [n for n in result.group_inputs if _is_input(spec, n)],
        EXAMPLE_CANDIDATES,
        seed + 1,
        rows,
    )
    try:
        _build_onnx(art, result, users, cands)
    except ExportError as e:  # the split is an optimisation: full.onnx still serves
        log.warning("UG split of '%s' dropped: %s", spec.name, e)
        art.user = art.group = None
        result.report.update(split=False, reason=f"building the split graphs failed: {e}")
        return art
    if out_dir is not None:
        art.paths = _write(art, Path(out_dir))
    return art


def _build_onnx(art: SplitArtifacts, result: SplitResult, users, cands) -> None:
    with torch.no_grad():
        boundary = list(result.user(*users.values()))
    index = torch.tensor([i % EXAMPLE_USERS for i in range(EXAMPLE_CANDIDATES)], dtype=torch.int64)
    art.user = _to_onnx(
        result.user,
        list(users.values()),
        result.user_inputs,
        [b["name"] for b in result.boundary],
        {n: "M" for n in result.user_inputs},
        "M",
    )
    group_args = [*cands.values(), *boundary, index]
    dims = {
        n: ("M" if n in {b["name"] for b in result.boundary} else "N") for n in result.group_inputs
    }
    art.group = _to_onnx(result.group, group_args, result.group_inputs, result.outputs, dims, "N")


def _is_input(spec: FeatureSpec, name: str) -> bool:
    return any(s.name == name for s in spec.inputs)


def _example(spec: FeatureSpec, names: list[str], n: int, seed: int, rows=None):
    rows = example_rows(spec, n, seed, rows)
    return {name: torch.from_numpy(np.ascontiguousarray(rows[name][:n])) for name in names}


def _to_onnx(gm, args, input_names, output_names, dims: dict[str, str], out_dim: str):
    """Re-capture one side with its own dynamic dims and convert it like full.onnx."""
    sym = {d: torch.export.Dim(d, min=1, max=MAX_BATCH) for d in set(dims.values())}
    shapes = tuple({0: sym[dims[n]]} for n in input_names)
    try:
        ep = torch.export.export(gm, tuple(args), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"re-capturing the {out_dim == 'M' and 'user' or 'group'} graph of the split failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    batch_dims = {**dims, **{o: out_dim for o in output_names}}
    return export_onnx(ep, input_names, output_names, batch_dims=batch_dims)


def _write(art: SplitArtifacts, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "user": out_dir / "user.onnx",
        "group": out_dir / "group.onnx",
        "report": out_dir / "split_report.json",
    }
    onnx.save(art.user, paths["user"])
    onnx.save(art.group, paths["group"])
    paths["report"].write_text(json.dumps(_jsonable(art.report), indent=2) + "\n")
    return paths


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---- pipeline steps (exporter.pipeline) ---------------------------------------------------


def step_split(ctx: ExportContext) -> None:
    """UG split (exporter.steps.split): user.onnx + group.onnx, manifest split/flops; else full only."""
    rows = ctx.options.data
    if rows is not None and ctx.store_rows is not None:  # cut tables: the stages read looked-up rows
        rows = ctx.store_rows({k: v[:256] for k, v in rows.items()})  # examples: a few rows
    art = split_to_onnx(ctx.program, ctx.graph_spec, seed=ctx.options.seed, rows=rows)
    ctx.manifest_fields["flops"] = Flops.from_dict(art.flops, "split step")
    ctx.extra_files["split_report.json"] = json.dumps(art.manifest_split() or {
        "report": art.report}, indent=2, default=str) + "\n"
    if art.is_split:
        ctx.stages["user"], ctx.stages["group"] = art.user, art.group
        ctx.manifest_fields["split"] = Split.from_dict(art.manifest_split(), "split step")


def step_row_scope(ctx: ExportContext) -> None:
    """manifest.row_scope: does each side keep the rows of a call apart (graph_passes.fx)?"""
    from exporter.progress import console
    from graph_passes.fx.row_scope import row_scope

    scope = row_scope(ctx.program, split="split" in ctx.manifest_fields)
    ctx.manifest_fields["row_scope"] = RowScope.from_dict(scope, "row-scope step")
    if scope["full"] == "request":
        where = "; ".join(f"{m['op']} ({m['reason']}) at {m['source'] or m['node']}" for m in scope["mixing"][:3])
        console.print(
            f"[yellow]request-scoped:[/] '{ctx.spec.name}' mixes the rows of a call ({where}); "
            "the runtime scores each request in its own group call"
        )
