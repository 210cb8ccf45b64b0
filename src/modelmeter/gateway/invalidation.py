"""Cache invalidation across replicas: what one replica changes, every replica's key cache forgets at once.

Each gateway caches principals (a key's tenant, plan, limits and credits epoch) for ``MODELMETER_KEY_CACHE_TTL_S``.
A change made through one replica (credits granted or paid, a tenant patched or suspended, a key revoked or
rolled) clears that replica's entries at once; with Redis it is also published on ``mm:invalidate``, and every
replica subscribed drops its own entries within a round trip (issue 21: other replicas saw new credits up to 30 s
late, and answered a prepaid tenant 429 meanwhile). A replica that loses the subscription forgets its whole cache
when it subscribes again (it may have missed messages); without Redis there is one process and nothing to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as redis

from modelmeter.gateway.auth import KeyAuthenticator, Principal
from modelmeter.gateway.redis_clients import redis_client

log = logging.getLogger("modelmeter.invalidation")

CHANNEL = "mm:invalidate"


class Invalidations:
    def __init__(self, auth: KeyAuthenticator, redis_url: str | None) -> None:
        self._auth = auth
        self._url = redis_url
        self._publisher: redis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def tenant(self, tenant_id: str) -> None:
        """Forget every cached key of ``tenant_id``, here and on every replica (callable from any thread)."""
        self._forget(f"t:{tenant_id}")
        self._publish(f"t:{tenant_id}")

    def key(self, key_id: str) -> None:
        """Forget the cached principal of key ``key_id``, here and on every replica."""
        self._forget(f"k:{key_id}")
        self._publish(f"k:{key_id}")

    def _forget(self, message: str) -> None:
        kind, _, ident = message.partition(":")
        match: Callable[[Principal], bool]
        if kind == "t":
            def match(p: Principal) -> bool:
                return p.tenant_id == ident
        elif kind == "k":
            def match(p: Principal) -> bool:
                return p.key_id == ident
        else:
            return  # not ours
        self._auth.invalidate(match)

    def _publish(self, message: str) -> None:
        if self._publisher is None or self._loop is None or self._loop.is_closed():
            return

        async def send() -> None:
            assert self._publisher is not None
            try:
                await self._publisher.publish(CHANNEL, message)
            except Exception:  # the other replicas' TTL still bounds how long they keep it
                log.warning("publishing a cache invalidation failed; other replicas forget it within the key TTL")

        try:
            if asyncio.get_running_loop() is self._loop:
                self._loop.create_task(send())
                return
        except RuntimeError:
            pass  # a worker thread (a sync route)
        asyncio.run_coroutine_threadsafe(send(), self._loop)

    async def start(self) -> None:
        if not self._url:
            return
        self._loop = asyncio.get_running_loop()
        self._publisher = redis_client(self._url)
        self._task = asyncio.create_task(self._listen(self._url), name="cache invalidations")

    async def _listen(self, url: str) -> None:
        # No socket timeout here: a subscription is idle by nature (get_message's own timeout paces the loop).
        client = redis.from_url(url, decode_responses=True, socket_connect_timeout=0.5, health_check_interval=10)
        pubsub = client.pubsub()
        try:
            while True:
                try:
                    await pubsub.subscribe(CHANNEL)
                    self._auth.invalidate()  # whatever was published while not subscribed
                    self.subscribed.set()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self._forget(str(message["data"]))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.subscribed.clear()
                    log.warning("the cache invalidation subscription dropped; subscribing again in 1 s")
                    await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call, unused-ignore]
                    pubsub = client.pubsub()
                    await asyncio.sleep(1)
        finally:
            # Bounded: a subscription cancelled half-way can leave redis-py's cleanup waiting on its connection.
            await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call, unused-ignore]
            await _quietly(client.aclose())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=3)  # never holds up shutdown
        if self._publisher is not None:
            await _quietly(self._publisher.aclose())


async def _quietly(closing: Awaitable[object]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closing, 1)


def publish_tenant_change(redis_url: str | None, tenant_id: str) -> bool:
    """From outside a gateway (the CLI): tell every running replica to forget ``tenant_id``'s cached keys.
    Returns whether it was published (no Redis, or Redis unreachable: the replicas' key TTL bounds it)."""
    return _publish_sync(redis_url, f"t:{tenant_id}")


def publish_key_change(redis_url: str | None, key_id: str) -> bool:
    """From outside a gateway: tell every running replica to forget key ``key_id`` (revoked or rolled)."""
    return _publish_sync(redis_url, f"k:{key_id}")


def _publish_sync(redis_url: str | None, message: str) -> bool:
    if not redis_url:
        return False
    import redis as sync_redis

    try:
        with sync_redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as client:
            client.publish(CHANNEL, message)
        return True
    except sync_redis.RedisError:
        log.warning("publishing a cache invalidation failed; replicas forget it within the key TTL")
        return False
