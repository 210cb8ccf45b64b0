"""The Redis clients of a gateway: quick to give up when Redis is unreachable, so a request answers 503."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff


def redis_client(redis_url: str) -> redis.Redis:
    """A client that gives up within ~2 s when Redis is unreachable (the request then answers 503
    ``service_unavailable``): redis-py's defaults wait 5 s per socket operation and retry three times with up to
    10 s of backoff. One quick retry, on a fresh connection, covers a pooled connection the server closed."""
    secure = redis_url.startswith("rediss://")
    return redis.from_url(redis_url, decode_responses=True, socket_timeout=0.75, socket_connect_timeout=0.5,
                          retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
                          connection_class=_SecureConnection if secure else _Connection)


class _ClosedTransportIsConnectionError:
    """Under uvloop, writing to a connection the peer has reset raises RuntimeError ("the handler is closed"),
    which redis-py neither converts nor retries: tests/integration/test_dependency_faults.py found it as 500s
    during a Redis outage. Here it is what it means, a ConnectionError (retried once, then a 503)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:  # redis-py has already dropped the connection
            raise redis_errors.ConnectionError(f"Error while writing to socket: {exc}") from exc


class _Connection(_ClosedTransportIsConnectionError, redis.Connection):
    pass


class _SecureConnection(_ClosedTransportIsConnectionError, redis.SSLConnection):
    pass
