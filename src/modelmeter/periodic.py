"""The one kind of background loop: a pass every few seconds, stopped after the pass in flight.

Every loop of the platform is a :class:`Periodic` (the Stripe and alert relays, the housekeeping flush, the
alert-tenant refresh, the engine's gauges, the fronts' engine pings are its async flavour).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable

log = logging.getLogger("modelmeter.periodic")


class Periodic:
    """Runs ``step`` every ``interval_s`` seconds, from ``start`` until ``stop``.

    A blocking ``step`` runs in a worker thread (``in_thread``, the default); a coroutine function or a quick
    callable (``in_thread=False``) runs on the event loop. ``immediately`` runs the first pass at start.
    ``stop`` waits for the pass in flight (a cancelled task would not stop its thread, and a thread still holding a
    pooled connection when the engine is disposed leaks it); a long pass checks ``stopping`` to end early. A failed
    pass is logged and retried at the next interval.
    """

    def __init__(self, step: Callable[[], object], *, name: str, in_thread: bool = True,
                 immediately: bool = False) -> None:
        self._step = step
        self._name = name
        self._in_thread = in_thread and not inspect.iscoroutinefunction(step)
        self._immediately = immediately
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, interval_s: float) -> None:  # float-ok: seconds
        """Start the loop (call from the event loop)."""
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run_forever(interval_s), name=self._name)

    async def _run_forever(self, interval_s: float) -> None:  # float-ok: seconds
        if self._immediately:
            await self._pass()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)
            if self._stop.is_set():
                return
            await self._pass()

    async def _pass(self) -> None:
        try:
            if self._in_thread:
                await asyncio.to_thread(self._step)
            else:
                outcome = self._step()
                if inspect.isawaitable(outcome):
                    await outcome
        except Exception:
            log.exception("%s failed; will retry", self._name)

    async def stop(self) -> None:
        """Stop the loop after the pass in flight."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def __aenter__(self) -> Periodic:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()
