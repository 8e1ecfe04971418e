"""Triton Inference Server glue: model repositories for bundles, and a local tritonserver.

    from runtime.triton import write_repository
    write_repository("bundle/", "repo/", kind="cpu")     # or kind="gpu"

Modules: ``repository`` (CPU repository, shared pieces), ``gpu`` (stage models + BLS
orchestrator), ``config`` (config.pbtxt rendering + validation against Triton's
ModelConfig schema), ``batch`` (the ranking wire format), ``env`` (the Python
environment tritonserver's Python backend needs), ``server`` (launch tritonserver on
loopback), ``cli`` (``ugsep triton``). Importing this package imports nothing heavy.
"""

from __future__ import annotations

from runtime.triton.repository import KINDS, Repository, RepositoryOptions, write_repository

__all__ = ["write_repository", "RepositoryOptions", "Repository", "KINDS"]
