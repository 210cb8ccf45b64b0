"""The messages between fronts and engines: msgspec structs over ZMQ, token ids and outputs as raw buffers.

A front's DEALER socket talks to an engine's ROUTER socket (``ipc://`` in the data dir). Requests carry a
front-chosen ``rid``; the engine answers each :class:`Infer` with exactly one :class:`Done` or :class:`Failed`
(none when it was cancelled). Token ids travel as little-endian int32 with a row-length vector; vectors and
class probabilities as float32, row-major, and a tagger's probabilities per token as float32 ``[tokens of every
row, labels]`` (the front splits them by the row lengths it sent). No pickle, no JSON: decoding never runs code,
and a message that does not decode is dropped and counted by the engine.
"""

from __future__ import annotations

import functools
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from modelmeter.models.outputs import TokenScores
from modelmeter.models.source import ModelSource


class Source(msgspec.Struct, array_like=True, frozen=True):
    """A model to run on: its id, artifact directory and task; ``base`` for a LoRA adapter."""

    model_id: str
    path: str
    task: str
    base: Source | None = None


class Infer(msgspec.Struct, tag=1, array_like=True):
    rid: int
    source: Source
    ids: bytes  # every row's token ids, concatenated (int32)
    lengths: bytes  # one int32 per row
    priority: int = 0  # lower is sooner (interactive 0)


class Cancel(msgspec.Struct, tag=2, array_like=True):
    rid: int


class Ping(msgspec.Struct, tag=3, array_like=True):
    seq: int
    front_pid: int


class StatsRequest(msgspec.Struct, tag=4, array_like=True):
    rid: int


# Both conversions are cached: a front sends the same few models' sources over and over, and building a Path per
# request was ~4% of an engine's GIL time in bench/fronts.py's profile. Both types are frozen (hashable).
@functools.lru_cache(maxsize=4096)
def wire(source: ModelSource) -> Source:
    return Source(source.model_id, str(source.path), source.task, wire(source.base) if source.base else None)


@functools.lru_cache(maxsize=4096)
def source_of(source: Source) -> ModelSource:
    return ModelSource(source.model_id, Path(source.path), source.task,
                       source_of(source.base) if source.base else None)


ToEngine = Infer | Cancel | Ping | StatsRequest


class Done(msgspec.Struct, tag=11, array_like=True):
    rid: int
    kind: str  # "vectors" | "scores" | "token_scores"
    rows: int
    cols: int
    data: bytes  # float32, rows x cols
    labels: list[str]  # the score columns' labels ("scores"), in order
    queue_us: int
    inference_us: int
    compute_us: int


class Failed(msgspec.Struct, tag=12, array_like=True):
    rid: int
    code: str  # "overloaded" | "model_unavailable" | "engine_error" | "closed"
    message: str


class Pong(msgspec.Struct, tag=13, array_like=True):
    seq: int
    pid: int
    device: str


class Stats(msgspec.Struct, tag=14, array_like=True):
    rid: int
    pid: int
    device: str
    simulated: bool
    batches: int
    rows: int
    mixed_batches: int
    queue_rows: int
    adapters_resident: int
    dropped_messages: int
    fronts: list[int]
    low_rows: int = 0  # rows served at low priority (batch lines); last and defaulted: old and new sides still decode


ToFront = Done | Failed | Pong | Stats

_BIG = sys.byteorder == "big"


def pack_ids(rows: Sequence[Sequence[int]]) -> tuple[bytes, bytes]:
    """Rows of token ids as (concatenated int32, int32 lengths)."""
    flat = array("i")
    for row in rows:
        flat.extend(row)
    lengths = array("i", [len(row) for row in rows])
    if _BIG:
        flat.byteswap()
        lengths.byteswap()
    return flat.tobytes(), lengths.tobytes()


def unpack_ids(ids: bytes, lengths: bytes) -> list[list[int]]:
    """The inverse of :func:`pack_ids`; ``ValueError`` when the buffers disagree."""
    flat, sizes = array("i"), array("i")
    flat.frombytes(ids)
    sizes.frombytes(lengths)
    if _BIG:
        flat.byteswap()
        sizes.byteswap()
    if any(n <= 0 for n in sizes) or sum(sizes) != len(flat):
        raise ValueError("row lengths do not match the ids")
    rows, at = [], 0
    for n in sizes:
        rows.append(flat[at: at + n].tolist())
        at += n
    return rows


def pack_floats(rows: Sequence[Sequence[float]]) -> bytes:
    flat = array("f")
    for row in rows:
        flat.extend(row)
    if _BIG:
        flat.byteswap()
    return flat.tobytes()


def unpack_floats(data: bytes, rows: int, cols: int) -> list[list[float]]:
    flat = array("f")
    flat.frombytes(data)
    if _BIG:
        flat.byteswap()
    if len(flat) != rows * cols:
        raise ValueError("output buffer does not match its shape")
    values = flat.tolist()
    return [values[i * cols: (i + 1) * cols] for i in range(rows)]


def pack_token_scores(rows: Sequence[TokenScores]) -> tuple[bytes, int, list[str]]:
    """Tagger rows (one label set: a request runs on one model) as float32 little-endian ``[tokens, labels]``."""
    labels = rows[0].labels
    data = np.concatenate([r.scores for r in rows]).astype("<f4", copy=False).tobytes()
    return data, sum(len(r.scores) for r in rows), list(labels)


def unpack_token_scores(done: Done, lengths: Sequence[int]) -> list[TokenScores]:
    """The inverse of :func:`pack_token_scores`, split by the rows' token counts; ``ValueError`` on a mismatch."""
    labels = tuple(done.labels)
    if done.cols != len(labels) or sum(lengths) != done.rows or len(done.data) != 4 * done.rows * done.cols:
        raise ValueError("token scores do not match their shape")
    flat = np.frombuffer(done.data, dtype="<f4").astype(np.float32, copy=False).reshape(done.rows, done.cols)
    out, at = [], 0
    for n in lengths:
        out.append(TokenScores(labels, flat[at: at + n]))
        at += n
    return out


def send_now(sock: Any, frames: list[Any]) -> bool:
    """Send without waiting on a zmq.asyncio socket; False when it would block (no engine connected).

    The asyncio socket's non-blocking send reports EAGAIN on the future it returns, not by raising; a future that
    is not done yet (it never is with NOBLOCK) has its outcome consumed so nothing is logged as unretrieved.
    """
    future = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    if future.done():
        return future.exception() is None
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return True


to_engine_encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
to_front_decoder = msgspec.msgpack.Decoder(ToFront)
