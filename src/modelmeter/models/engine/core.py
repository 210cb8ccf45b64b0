"""The engine process's loop: rows from every front in, one batcher per model, results back.

It binds a ROUTER socket at ``ipc://<data dir>/run/engine-N.sock`` (the directory is 0700: nothing new is
reachable from outside) and serves the fronts' DEALER sockets. Each :class:`~protocol.Infer` becomes a task that
joins the model's batcher in the engine's :class:`~modelmeter.models.serving.ModelServer`, so one batch carries
the rows of every front, at the request's priority (a batch line's rows are served behind interactive ones; see
:mod:`~modelmeter.models.batching`). A message that does not decode is dropped and counted, never fatal. The engine
never touches the database: it answers rows, the front bills them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from modelmeter.models.batching import BatcherClosed, OnBatch, QueueFull
from modelmeter.models.engine import protocol as p
from modelmeter.models.outputs import TokenScores
from modelmeter.models.pool import ModelLoadError
from modelmeter.models.serving import ModelServer

log = logging.getLogger("modelmeter.engine")
FRONT_SEEN_S = 5.0  # a front that has not pinged for this long is no longer listed


@dataclass
class EngineCounters:
    """Since the engine started: batches and rows computed, messages dropped."""

    batches: int = 0
    rows: int = 0
    low_rows: int = 0  # rows of requests served at low priority (batch lines)
    mixed_batches: int = 0  # batches that carried rows of more than one front
    dropped_messages: int = 0
    fronts: dict[int, float] = field(default_factory=dict)  # pid -> last ping (loop time)

    def wrap(self, inner: OnBatch | None) -> OnBatch:
        def on_batch(size: int, real: int, padded: int, waited: float, compute: float) -> None:
            self.batches += 1
            self.rows += size
            if inner is not None:
                inner(size, real, padded, waited, compute)

        return on_batch

    def on_origins(self, fronts: int) -> None:
        if fronts > 1:
            self.mixed_batches += 1


def batch_priority(priority: int) -> int:
    """The batcher's priority for a request's: a negative one (nothing is sooner than interactive) is interactive."""
    return max(0, priority)


def bind_path(path: Path) -> str:
    """Prepare ``path``'s directory (0700) and clear a stale socket file; the ``ipc://`` address."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    return f"ipc://{path}"


class EngineCore:
    """Serves one ROUTER socket from ``server`` until :meth:`stop`."""

    def __init__(self, server: ModelServer, counters: EngineCounters, *, path: Path, simulated: bool) -> None:
        self.server = server
        self.counters = counters
        self.path = path
        self.simulated = simulated
        self._device = server.device.type
        self._pid = os.getpid()
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._origins: dict[bytes, bytes] = {}
        self._decode = p.to_engine_decoder.decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._stop = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(bind_path(path))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                receiving = asyncio.ensure_future(self._sock.recv_multipart(copy=False))
                await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    break
                frames = receiving.result()
                self._handle(frames)
        finally:
            stopping.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._sock.close(linger=0)
            self._ctx.term()
            self.path.unlink(missing_ok=True)

    def _handle(self, frames: list[Any]) -> None:
        if len(frames) != 2:
            self.counters.dropped_messages += 1
            return
        ident = frames[0].bytes
        try:
            message = self._decode(frames[1].buffer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counters.dropped_messages += 1
            return
        if isinstance(message, p.Infer):
            key = (ident, message.rid)
            if key in self._tasks:
                self.counters.dropped_messages += 1
                return
            task = asyncio.get_running_loop().create_task(self._infer(ident, message))
            self._tasks[key] = task
            task.add_done_callback(lambda _, key=key: self._tasks.pop(key, None))  # type: ignore[misc]
        elif isinstance(message, p.Cancel):
            running = self._tasks.get((ident, message.rid))
            if running is not None:
                running.cancel()
        elif isinstance(message, p.Ping):
            if message.front_pid:  # 0: the supervisor's readiness probe, not a front
                self.counters.fronts[message.front_pid] = asyncio.get_running_loop().time()
            self._send(ident, p.Pong(message.seq, self._pid, self._device))
        else:
            self._send(ident, self._stats(message.rid))

    def _send(self, ident: bytes, message: msgspec.Struct) -> None:
        try:
            if not p.send_now(self._sock, [ident, self._encode(message)]):
                log.debug("reply to a departed front dropped")
        except zmq.ZMQError as exc:  # the front went away
            log.debug("reply to a departed front dropped: %r", exc)

    async def _infer(self, ident: bytes, message: p.Infer) -> None:
        rid = message.rid
        try:
            ids = p.unpack_ids(message.ids, message.lengths)
            source = p.source_of(message.source)
        except ValueError as exc:
            self.counters.dropped_messages += 1
            self._send(ident, p.Failed(rid, "engine_error", f"malformed request: {exc}"))
            return
        reply: msgspec.Struct
        priority = batch_priority(message.priority)
        try:
            async with self.server.use(source) as lease:
                submission = await lease.batcher.submit(ids, lease.tag, origin=self._origin(ident), priority=priority)
            if priority:
                self.counters.low_rows += len(ids)
            reply = _done(rid, submission.results, submission.queue_s, submission.inference_s, submission.compute_s)
        except QueueFull as exc:
            reply = p.Failed(rid, "overloaded", str(exc))
        except ModelLoadError as exc:
            reply = p.Failed(rid, "model_unavailable", f"{exc.model_id}\n{exc.reason}")
        except BatcherClosed as exc:
            reply = p.Failed(rid, "closed", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %d failed in the engine", rid)
            reply = p.Failed(rid, "engine_error", type(exc).__name__)
        self._send(ident, reply)

    def _origin(self, ident: bytes) -> object:
        """One object per front (the batcher counts distinct origins by identity)."""
        return self._origins.setdefault(ident, ident)

    def _stats(self, rid: int) -> p.Stats:
        now = asyncio.get_running_loop().time()
        fronts = self.counters.fronts
        for pid in [pid for pid, seen in fronts.items() if now - seen > FRONT_SEEN_S]:
            del fronts[pid]
        queue_rows, adapters = server_load(self.server)
        c = self.counters
        return p.Stats(rid, self._pid, self._device, self.simulated, c.batches, c.rows, c.mixed_batches, queue_rows,
                       adapters, c.dropped_messages, sorted(fronts), c.low_rows)


def server_load(server: ModelServer) -> tuple[int, int]:
    """Rows waiting in every batcher of ``server`` (of both priorities), and adapters resident on its bases."""
    queue_rows = 0
    for pool in (server.pool, server.bases):
        for model_id in pool.loaded():
            served = pool.peek(model_id)
            if served is not None:
                queue_rows += served.batcher.queue_depth
    return queue_rows, sum(len(base.adapters.loaded()) for base in server.shared_bases())


def _done(rid: int, results: list[Any], queue_s: float, inference_s: float, compute_s: float) -> p.Done:
    timing = (int(queue_s * 1e6), int(inference_s * 1e6), int(compute_s * 1e6))
    if results and isinstance(results[0], TokenScores):
        data, tokens, labels = p.pack_token_scores(results)
        return p.Done(rid, "token_scores", tokens, len(labels), data, labels, *timing)
    if results and isinstance(results[0], dict):
        labels = list(results[0])
        data = p.pack_floats([[row[label] for label in labels] for row in results])
        return p.Done(rid, "scores", len(results), len(labels), data, labels, *timing)
    cols = len(results[0]) if results else 0
    return p.Done(rid, "vectors", len(results), cols, p.pack_floats(results), [], *timing)
