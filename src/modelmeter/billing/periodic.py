"""A blocking pass run every few seconds in a worker thread, stopped after the pass in flight (the relays' loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("modelmeter.periodic")


class Periodic:
    """Runs ``step`` in a worker thread every ``interval_s`` seconds, from ``start`` until ``stop``.

    ``stop`` waits for the pass in flight (a cancelled task would not stop its thread, and a thread still holding a
    pooled connection when the engine is disposed leaks it); a long pass checks ``stopping`` to end early. A failed
    pass is logged and retried at the next interval.
    """

    def __init__(self, step: Callable[[], object], *, name: str) -> None:
        self._step = step
        self._name = name
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, interval_s: float) -> None:  # float-ok: seconds
        """Start the loop (call from the event loop)."""
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run_forever(interval_s))

    async def _run_forever(self, interval_s: float) -> None:  # float-ok: seconds
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)
            if self._stop.is_set():
                return
            try:
                await asyncio.to_thread(self._step)
            except Exception:
                log.exception("%s failed; will retry", self._name)

    async def stop(self) -> None:
        """Stop the loop after the pass in flight."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
