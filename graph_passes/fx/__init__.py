"""FX passes on torch.export graphs: side analysis, row-wise proof, FLOPs, the UG split.

    SideAnalysisPass     meta["ugsep.side"] in user / group / const / shape
    FlopCountPass        meta["ugsep.flops"] (per row), totals per side
    SplitUserGroupPass   user graph + group graph + boundary tensors + report

Each pass: config in ``__init__``, work in ``call(ep) -> PassResult``.
"""

from __future__ import annotations

from graph_passes.fx._base import FLOPS_KEY, PASS_KEY, SIDE_KEY, PassResult
from graph_passes.fx.cut import USER_INDEX, SplitResult, SplitUserGroupPass
from graph_passes.fx.flops import FlopCountPass, ceiling
from graph_passes.fx.sides import SideAnalysisPass

__all__ = [
    "FLOPS_KEY",
    "PASS_KEY",
    "SIDE_KEY",
    "USER_INDEX",
    "FlopCountPass",
    "PassResult",
    "SideAnalysisPass",
    "SplitResult",
    "SplitUserGroupPass",
    "ceiling",
]
