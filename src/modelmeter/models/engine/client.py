"""What the routes call to run rows on a model: ``EngineClient.submit(source, ids) -> Submission``.

Two implementations behind one interface: :class:`~modelmeter.models.engine.local.LocalEngine` runs the model
server in this process (tests, ``serve`` with one process), :class:`RemoteEngine` sends the rows to engine
processes over ZMQ. This module imports no torch: a front process never loads it.

The remote client keeps one DEALER socket per engine. An engine is *up* once it answered a ping; it goes *down*
when its socket disconnects (the engine process died: ZMQ's monitor says so at once) or stops answering pings
(a hung engine, after ``hang_s``). Going down fails every request waiting on that engine with
:class:`EngineUnavailable` (the route answers 503 and releases the reservation: nothing unanswered is billed),
and new requests fail the same way at once until a ping is answered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from modelmeter.models.batching import BatcherClosed, QueueFull, Submission
from modelmeter.models.engine import protocol as p
from modelmeter.models.outputs import Result
from modelmeter.models.pool import ModelLoadError
from modelmeter.models.source import ModelSource
from modelmeter.periodic import Periodic

log = logging.getLogger("modelmeter.engine.client")



class EngineUnavailable(Exception):
    """The engine serving this model is not running (died, restarting, or not started yet)."""


class EngineError(Exception):
    """The engine failed this request itself (not a restart: retrying does not help)."""


EngineStats = p.Stats  # one engine's counters since it started (``GET /admin/engine``)


class EngineClient(Protocol):
    """The interface the routes use, whichever side of a socket the engine is on."""

    def device_for(self, source: ModelSource) -> str:
        """The device type rows of ``source`` run on: it goes into the usage row (compute is priced by it)."""
        ...

    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def submit(self, source: ModelSource, ids: list[list[int]], *, priority: int = 0) -> Submission[Result]:
        """One result per row; raises ``QueueFull``, ``ModelLoadError``, ``EngineUnavailable``."""
        ...

    async def stats(self) -> tuple[list[int], list[EngineStats]]:
        """The fronts the engines have heard from (pids) and each engine's counters."""
        ...

    async def aclose(self) -> None: ...


class _Link:
    """One engine's socket, its requests in flight and whether it answers."""

    def __init__(self, ctx: zmq.asyncio.Context, path: Path) -> None:
        self.path = path
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a connected engine: none -> EAGAIN, not a backlog
        self.sock.setsockopt(zmq.SNDHWM, 0)  # requests in flight are bounded by the engine's permits, not here
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(f"ipc://{path}")
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.up = False
        self.last_pong = 0.0
        self.device = "cpu"
        self.pid = 0

    def down(self, reason: str) -> None:
        if self.up:
            log.warning("engine at %s is unavailable: %s", self.path, reason)
        self.up = False
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))


class RemoteEngine:
    """Engines in other processes, one per device, reached over ``ipc://`` sockets.

    Rows of one model always go to the same engine (its adapters and batches live there): the model, or the
    adapter's base, picks the engine by a stable hash.
    """

    def __init__(self, sockets: Sequence[Path], *, ping_s: float = 0.2, hang_s: float = 2.0) -> None:
        if not sockets:
            raise ValueError("at least one engine socket is needed")
        self._paths = list(sockets)
        self._ping_s = ping_s
        self._hang_s = hang_s
        self._ctx: zmq.asyncio.Context | None = None
        self._links: list[_Link] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._beats: list[Periodic] = []
        self._rids = itertools.count(1)
        self._pid = os.getpid()
        self._encode = p.to_engine_encoder.encode
        self._decode = p.to_front_decoder.decode

    def device_for(self, source: ModelSource) -> str:
        return self._link_for(source).device

    def ready(self) -> bool:
        return bool(self._links) and all(link.up for link in self._links)

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._links = [_Link(self._ctx, path) for path in self._paths]
        loop = asyncio.get_running_loop()
        for link in self._links:
            self._tasks += [loop.create_task(self._read(link)), loop.create_task(self._watch(link))]
            beat = Periodic(lambda link=link: self._beat(link), name="engine ping",  # type: ignore[misc]
                            in_thread=False, immediately=True)
            beat.start(self._ping_s)
            self._beats.append(beat)

    async def wait_ready(self, timeout_s: float) -> bool:  # float-ok: seconds
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _link_for(self, source: ModelSource) -> _Link:
        if len(self._links) == 1:
            return self._links[0]
        key = (source.base or source).model_id
        return self._links[zlib.crc32(key.encode()) % len(self._links)]

    async def submit(self, source: ModelSource, ids: list[list[int]], *, priority: int = 0) -> Submission[Result]:
        if not ids:
            return Submission(results=[], queue_s=0.0, inference_s=0.0)
        link = self._link_for(source)
        if not link.up:
            raise EngineUnavailable("the engine is not running")
        rid = next(self._rids)
        flat, lengths = p.pack_ids(ids)
        payload = self._encode(p.Infer(rid, p.wire(source), flat, lengths, priority))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending[rid] = future
        if not p.send_now(link.sock, [payload]):
            link.pending.pop(rid, None)
            raise EngineUnavailable("the engine is not connected")
        try:
            reply = await future
        except asyncio.CancelledError:
            if link.pending.pop(rid, None) is not None:  # the client left: the engine drops the rows
                p.send_now(link.sock, [self._encode(p.Cancel(rid))])
            raise
        return _submission(reply, ids)

    async def stats(self) -> tuple[list[int], list[EngineStats]]:
        fronts: set[int] = set()
        engines: list[EngineStats] = []
        for link in self._links:
            if not link.up:
                continue
            rid = next(self._rids)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            link.pending[rid] = future
            try:
                if not p.send_now(link.sock, [self._encode(p.StatsRequest(rid))]):
                    raise EngineUnavailable("not connected")
                async with asyncio.timeout(2.0):
                    reply: p.Stats = await future
            except (TimeoutError, EngineUnavailable):
                continue
            finally:
                link.pending.pop(rid, None)  # answered, timed out or cancelled: nothing is left waiting
            fronts.update(reply.fronts)
            engines.append(reply)
        return sorted(fronts), engines

    async def _read(self, link: _Link) -> None:
        while True:
            try:
                frame = await link.sock.recv(copy=False)
                message = self._decode(frame.buffer)
            except asyncio.CancelledError:
                raise
            except (msgspec.DecodeError, zmq.ZMQError) as exc:
                log.warning("undecodable message from the engine at %s: %r", link.path, exc)
                continue
            if isinstance(message, p.Pong):
                link.last_pong, link.device, link.pid = time.monotonic(), message.device, message.pid
                link.up = True
                continue
            future = link.pending.pop(message.rid, None)
            if future is not None and not future.done():
                future.set_result(message)

    async def _watch(self, link: _Link) -> None:
        """The engine's connection events: a disconnect means the process is gone (or restarting)."""
        while True:
            event = parse_monitor_message(await link.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                link.down("the engine disconnected")
            elif event["event"] == zmq.EVENT_CONNECTED:
                self._ping(link, 0)

    def _beat(self, link: _Link) -> None:
        if link.up and time.monotonic() - link.last_pong > self._hang_s:
            link.down(f"no answer to pings for {self._hang_s:g} s")
        self._ping(link, next(self._rids))

    def _ping(self, link: _Link, seq: int) -> None:
        with contextlib.suppress(zmq.ZMQError):
            p.send_now(link.sock, [self._encode(p.Ping(seq, self._pid))])

    async def aclose(self) -> None:
        for beat in self._beats:
            await beat.stop()
        self._beats = []
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for link in self._links:
            link.down("the front is shutting down")
            link.monitor.close(linger=0)
            link.sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def _submission(reply: p.Done | p.Failed, ids: list[list[int]]) -> Submission[Result]:
    if isinstance(reply, p.Failed):
        raise _error_of(reply)
    results: list[Result]
    if reply.kind == "token_scores":
        results = list(p.unpack_token_scores(reply, [len(row) for row in ids]))
        return Submission(results=results, queue_s=reply.queue_us / 1e6, inference_s=reply.inference_us / 1e6,
                          compute_s=reply.compute_us / 1e6)
    vectors = p.unpack_floats(reply.data, reply.rows, reply.cols)
    if reply.kind == "scores":
        labels = reply.labels
        results = [dict(zip(labels, row, strict=True)) for row in vectors]
    else:
        results = list(vectors)
    return Submission(results=results, queue_s=reply.queue_us / 1e6, inference_s=reply.inference_us / 1e6,
                      compute_s=reply.compute_us / 1e6)


def _error_of(reply: p.Failed) -> Exception:
    if reply.code == "overloaded":
        return QueueFull(reply.message)
    if reply.code == "model_unavailable":
        model_id, _, reason = reply.message.partition("\n")
        return ModelLoadError(model_id, reason)
    if reply.code == "closed":
        return BatcherClosed(reply.message)
    return EngineError(reply.message)
