"""The in-process engine: the model server in the front's own process, behind the :class:`EngineClient`
interface (tests, and ``serve`` with one process where the hop to another process buys nothing)."""

from __future__ import annotations

import os

from modelmeter.models.batching import Submission
from modelmeter.models.engine.client import EngineStats
from modelmeter.models.engine.core import EngineCounters, batch_priority, server_load
from modelmeter.models.outputs import Result
from modelmeter.models.serving import ModelServer
from modelmeter.models.source import ModelSource


class LocalEngine:
    """Runs rows on ``server`` in this process; ``counters`` must be the ones its batch hook updates."""

    def __init__(self, server: ModelServer, counters: EngineCounters | None = None) -> None:
        self.server = server
        self.counters = counters or EngineCounters()

    @property
    def device(self) -> str:
        return self.server.device.type

    def device_for(self, source: ModelSource) -> str:
        return self.device

    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def submit(self, source: ModelSource, ids: list[list[int]], *, priority: int = 0) -> Submission[Result]:
        priority = batch_priority(priority)
        async with self.server.use(source) as lease:
            submission = await lease.batcher.submit(ids, lease.tag, priority=priority)
        if priority:
            self.counters.low_rows += len(ids)
        return submission

    async def stats(self) -> tuple[list[int], list[EngineStats]]:
        server, c = self.server, self.counters
        queue_rows, adapters = server_load(server)
        engine = EngineStats(0, os.getpid(), self.device, server.simulated is not None, c.batches, c.rows,
                             c.mixed_batches, queue_rows, adapters, c.dropped_messages, [os.getpid()], c.low_rows)
        return [os.getpid()], [engine]

    async def aclose(self) -> None:
        await self.server.close()
