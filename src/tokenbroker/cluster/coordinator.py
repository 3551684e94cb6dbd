"""Change notices across processes over Redis pub/sub (the engine's
:class:`~tokenbroker.engine.coordination.Coordinator`).

Every process subscribes once to one channel, ``tokenbroker:<namespace>:changes``, whose
messages are topics (``credential:<row id>``, ``consumers``); a message wakes this process's
watches on that topic. The namespace is a digest of the store URL, so brokers on different
stores sharing one Redis never wake each other (and the URL, which may hold a password,
never appears in Redis).

Pub/sub loses what is published while a subscriber reconnects, so after every
(re)subscription all local watches are woken: their owners re-read the store. Publishing
is fire-and-forget and skipped while the breaker is open; notices in this process are
delivered at once either way.

It is also the engine's :class:`~tokenbroker.engine.coordination.SharedLimits`: the
invalidate cooldown is a ``SET NX PX`` key, a provider's scope sets (``max_scopes``) a Redis
set grown by one Lua script, and "token dropped" notices (``dropped:<name>:<digest>`` on the
same channel) reach every process's listeners. Keys live under the same namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ..core.secret import Secret
from ..engine.coordination import LocalCoordinator, Watch
from ..errors import CoordinationUnavailableError
from .link import RedisLink
from .windows import RedisWindows

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["ADMIT", "RedisCoordinator", "announce", "channel_for", "coordinator_for", "windows_for"]

logger = logging.getLogger("tokenbroker.cluster")

#: Longest topic accepted from the channel (anything longer is not ours).
_MAX_TOPIC = 256

#: The prefix of "token dropped" notices: ``dropped:<name>:<digest>``.
_DROPPED = "dropped:"

#: KEYS[1]: the set; ARGV: member, seed, limit. 1 when the member is (now) in, 0 when full.
ADMIT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
redis.call('SADD', KEYS[1], ARGV[2])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


def channel_for(store_url: str) -> str:
    """The pub/sub channel of the brokers sharing the store at ``store_url``."""
    return f"tokenbroker:{hashlib.sha256(store_url.encode()).hexdigest()[:16]}:changes"


class RedisCoordinator:
    """Notices for this process (at once) and for every process subscribed to the channel.

    Args:
        link: The Redis link (its breaker decides whether to publish).
        channel: The channel (see :func:`channel_for`).
        owns_link: Close ``link`` on :meth:`close`.
    """

    def __init__(self, link: RedisLink, channel: str, *, owns_link: bool = True) -> None:
        self.link = link
        self.channel = channel
        self._local = LocalCoordinator()
        self._owns_link = owns_link
        self._subscribed_flag = False
        self._prefix = channel.removesuffix(":changes")
        self._admit = link.client.register_script(ADMIT)
        self._dropped: list[Callable[[str, str], None]] = []
        link.add_task(self._listen())

    def __repr__(self) -> str:
        return f"RedisCoordinator(link={self.link!r})"

    def publish(self, topic: str) -> None:
        """Wake this process's watches on ``topic`` now; tell the others through Redis."""
        self._local.publish(topic)
        channel = self.channel
        self.link.submit(lambda client: client.publish(channel, topic))

    def watch(self, topic: str) -> AbstractContextManager[Watch]:
        """A watch on ``topic``, woken by notices from this process or any other."""
        return self._local.watch(topic)

    def degraded(self) -> str | None:
        """The breaker's reason while Redis is not answering, else None."""
        return self.link.breaker.reason

    def claim(self, name: str, seconds: float) -> bool:
        """Take ``name`` for ``seconds`` across every process (``SET NX PX``).

        Returns:
            True if taken now; False if some process holds it.

        Raises:
            CoordinationUnavailableError: Redis did not answer (or the breaker is open).
        """
        key, millis = f"{self._prefix}:claim:{name}", max(1, int(seconds * 1000))
        return bool(self.link.call(lambda client: client.set(key, b"1", nx=True, px=millis)))

    def admit(self, name: str, member: str, seed: str, limit: int) -> bool:
        """Grow the shared set ``name`` (seeded with ``seed``) by ``member`` up to ``limit``.

        Returns:
            True if ``member`` is in the set; False if the set is full without it.

        Raises:
            CoordinationUnavailableError: Redis did not answer (or the breaker is open).
        """
        key = f"{self._prefix}:set:{name}"

        async def run(client: Redis) -> object:
            return await self._admit(keys=[key], args=[member, seed, limit], client=client)

        return bool(int(str(self.link.call(run))))

    def dropped(self, name: str, digest: str) -> None:
        """Publish "the token ``digest`` of ``name`` was dropped" (fire-and-forget)."""
        channel, topic = self.channel, f"{_DROPPED}{name}:{digest}"
        self.link.submit(lambda client: client.publish(channel, topic))

    def on_dropped(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(name, digest)`` on the link's thread for every "dropped" notice."""
        self._dropped.append(callback)

    @property
    def listening(self) -> bool:
        """Whether the subscriber is currently subscribed to the channel."""
        return self._subscribed_flag

    def close(self) -> None:
        """Stop listening; close the link if this coordinator owns it."""
        if self._owns_link:
            self.link.close()

    async def _listen(self) -> None:
        """Subscribe, dispatch, and after any failure subscribe again (waking every watch)."""
        link = self.link
        while True:
            pubsub = link.client.pubsub()
            try:
                async with asyncio.timeout(link.timeout):
                    await pubsub.subscribe(self.channel)
                self._subscribed_flag = True
                self._local.wake_all()  # notices may have been lost before or between
                await self._dispatch(pubsub)
            except asyncio.CancelledError:
                raise
            except link.errors as exc:
                logger.debug("redis subscriber lost: %s", type(exc).__name__)
                link.breaker.failed(exc)
            finally:
                self._subscribed_flag = False
                with contextlib.suppress(*link.errors, RuntimeError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(min(link.breaker.cooldown, 0.5))

    async def _dispatch(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            data = message.get("data")
            if isinstance(data, bytes) and len(data) <= _MAX_TOPIC:
                topic = data.decode("utf-8", "replace")
                if topic.startswith(_DROPPED):
                    self._deliver_dropped(topic.removeprefix(_DROPPED))
                else:
                    self._local.publish(topic)

    def _deliver_dropped(self, rest: str) -> None:
        name, _, digest = rest.rpartition(":")
        for callback in list(self._dropped):
            try:
                callback(name, digest)
            except Exception:  # a listener's bug must not stop the subscriber
                logger.exception("token-dropped listener failed")


def coordinator_for(redis_url: Secret, store_url: str) -> RedisCoordinator:
    """The coordinator of a broker configured with ``redis: URL`` on the store ``store_url``.

    Raises:
        ConfigError: The ``redis`` extra is not installed (the message says what to install).
    """
    return RedisCoordinator(RedisLink(redis_url), channel_for(store_url))


def announce(redis_url: Secret, store_url: str, topic: str) -> bool:
    """Publish one notice from a short-lived process (``tokenbroker consumers remove``) and
    wait for Redis to take it; the followers' poll covers a notice that could not be sent.

    Returns:
        Whether Redis took the notice.

    Raises:
        ConfigError: The ``redis`` extra is not installed.
    """
    link = RedisLink(redis_url, probe_seconds=3600)
    channel = channel_for(store_url)
    try:
        link.call(lambda client: client.publish(channel, topic))
    except CoordinationUnavailableError:
        return False
    finally:
        link.close()
    return True


def windows_for(coordinator: object) -> RedisWindows | None:
    """Shared rate-limit windows on the same Redis as ``coordinator`` (a broker's), or None
    when it is not a :class:`RedisCoordinator` (no Redis configured)."""
    if not isinstance(coordinator, RedisCoordinator):
        return None
    return RedisWindows(coordinator.link, coordinator.channel.removesuffix(":changes") + ":limit")
