"""A TCP proxy the tests put between the gateway and PostgreSQL or Redis, to cut and restore real connections.

``cut()`` closes every proxied connection (both ends) and refuses new ones until ``restore()``: what the gateway
sees when the server process dies or the network partitions with resets. ``blackhole()`` drops the packets instead
(nothing is reset: a partition or a frozen host). Runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._up = True
        self._dropping = False
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, sock=self._sock)
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            _reset(writer)

    def cut(self) -> None:
        def go() -> None:
            self._up = False
            for writer in list(self._writers):
                _reset(writer)
            self._writers.clear()

        self._loop.call_soon_threadsafe(go)

    def blackhole(self) -> None:
        """Drop every packet to and from the proxy's port (iptables on loopback), resetting nothing: what a
        partitioned network or a frozen host looks like. Needs root and iptables; ``restore`` lifts it."""
        for rule in self._rules():
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
        self._dropping = True

    def restore(self) -> None:
        if self._dropping:
            for rule in self._rules():
                subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)
            self._dropping = False
        self._loop.call_soon_threadsafe(setattr, self, "_up", True)

    def _rules(self) -> list[list[str]]:
        return [["INPUT", "-i", "lo", "-p", "tcp", f"--{end}", str(self.port), "-j", "DROP"]
                for end in ("dport", "sport")]

    def close(self) -> None:
        self.restore()
        self.cut()

        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a dead peer's kernel would answer."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(Exception):
        writer.close()


def can_blackhole() -> bool:
    """Whether ``FaultProxy.blackhole`` can work here: root and an iptables that can list its rules."""
    if shutil.which("iptables") is None:
        return False
    return subprocess.run(["iptables", "-S", "INPUT"], capture_output=True).returncode == 0
