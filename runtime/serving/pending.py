"""Bundles waiting for their embedding tier: loaded in the background once it is complete.

A server started with ``--embeddings redis://…`` before the cluster holds the complete
version a bundle's manifest pins does not exit: the model stays unloaded,
``/v2/health/ready`` and the model's ready endpoint answer 503, an infer on it answers
503 (gRPC: UNAVAILABLE) with ``Retry-After`` (gRPC: ``retry-after`` trailing metadata) and
a message saying the model is loading and naming the missing version, and a background
task retries the load every ``interval_s`` until it succeeds (then the model is warmed up,
its batcher started, and readiness turns true).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from pathlib import Path

from runtime.bundle import Bundle
from runtime.errors import TierUnavailableError

log = logging.getLogger(__name__)


class PendingLoads:
    """Model name -> (bundle path, why it is not loaded yet)."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.waiting: dict[str, tuple[Path, str]] = {}
        self._task: asyncio.Task | None = None

    def add(self, path: str | Path, error: TierUnavailableError) -> None:
        name = Bundle.open(path, verify=False).manifest.model_name
        self.waiting[name] = (Path(path), str(error))
        log.warning("model '%s' not loaded yet: %s (retrying every %.0f s)", name, error, self.interval_s)

    def message(self, name: str) -> str | None:
        entry = self.waiting.get(name)
        if entry is None:
            return None
        return (f"model '{name}' is loading: waiting for its embedding tier ({entry[1]}); "
                f"retry in {self.retry_after_s} s")

    @property
    def retry_after_s(self) -> int:
        """Whole seconds until the next load attempt at most (``Retry-After``)."""
        return max(1, math.ceil(self.interval_s))

    def start(self, repo, load_model) -> None:
        if self.waiting:
            self._task = asyncio.create_task(self._retry(repo, load_model))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _retry(self, repo, load_model) -> None:
        while self.waiting:
            await asyncio.sleep(self.interval_s)
            for name, (path, _) in list(self.waiting.items()):
                try:
                    model = await asyncio.to_thread(load_model, path, repo.options)
                except TierUnavailableError as e:
                    self.waiting[name] = (path, str(e))
                    continue
                repo.add(model)
                await repo._start(model)
                del self.waiting[name]
                log.info("model '%s' loaded: its embedding tier now holds the version", name)
