"""An app served by uvicorn in a thread of the test process, on a loopback port."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


class LiveServer:
    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.app = app


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int = 0, *, timeout_s: float = 60, **config: Any) -> Iterator[LiveServer]:
    """``app`` served by uvicorn in a daemon thread at ``port`` (0: a free one) until the block ends."""
    import uvicorn

    options: dict[str, Any] = {"log_level": "warning", "access_log": False, "lifespan": "on", **config}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{bound}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
