"""The serving pipeline's engine hop watches the connection: a client that leaves has its rows dropped (the engine
sees the cancellation) and gets 499; the engine's errors become the contract's; a cancelled request lets go."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from modelmeter.errors import ClientDisconnectedError, ServiceUnavailableError
from modelmeter.gateway.inference import _submit
from modelmeter.models.engine.client import EngineUnavailable


class Engines:
    def __init__(self, *, seconds: float = 10.0, error: Exception | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.cancelled = False

    async def submit(self, source: Any, ids: Any, *, priority: int = 0) -> str:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return "served"


def _request(leaves_after: float | None) -> Any:
    async def receive() -> dict[str, str]:
        if leaves_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(leaves_after or 0)
        return {"type": "http.disconnect"}

    return SimpleNamespace(receive=receive, state=SimpleNamespace(model_id="m"))


def _services(engines: Engines) -> Any:
    return SimpleNamespace(engines=engines, telemetry=SimpleNamespace(overloaded=lambda model: None))


def test_a_departed_client_cancels_its_rows() -> None:
    engines = Engines()
    with pytest.raises(ClientDisconnectedError):
        asyncio.run(_submit(_request(0.01), _services(engines), None, [[1]]))  # type: ignore[arg-type]
    assert engines.cancelled


def test_a_served_request_returns_the_engines_answer() -> None:
    engines = Engines(seconds=0.01)
    assert asyncio.run(_submit(_request(None), _services(engines), None, [[1]])) == "served"  # type: ignore[arg-type]
    assert not engines.cancelled


def test_an_engine_that_is_gone_is_503_engine_unavailable() -> None:
    engines = Engines(seconds=0, error=EngineUnavailable("gone"))
    with pytest.raises(ServiceUnavailableError) as caught:
        asyncio.run(_submit(_request(None), _services(engines), None, [[1]]))  # type: ignore[arg-type]
    assert caught.value.code == "engine_unavailable"
    assert caught.value.headers["Retry-After"] == "1"


def test_a_cancelled_request_lets_go_of_its_rows() -> None:
    engines = Engines()

    async def main() -> None:
        task = asyncio.ensure_future(_submit(_request(None), _services(engines), None, [[1]]))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engines.cancelled
