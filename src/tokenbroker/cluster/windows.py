"""Rate-limit windows shared by every process through Redis: one Lua script, one round trip.

:class:`RedisWindows` implements :class:`tokenbroker.edge.ratelimit.SharedWindows`: a moving
window per key as a sorted set of hit times, trimmed, counted and added to atomically on
Redis's own clock (``TIME``), so N replicas share one budget instead of having N. A refused
hit is not recorded (as the ``limits`` library's moving window). Any failure raises
:class:`~tokenbroker.errors.CoordinationUnavailableError` and the caller counts in its own
process instead: a limit may loosen while Redis is away, the service never stops.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from .link import RedisLink

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["MOVING_WINDOW", "RedisWindows"]

#: KEYS[1]: the window; ARGV: limit, window in ms, a unique member.
#: Returns 0 when the hit is counted, else the milliseconds until the oldest hit leaves.
MOVING_WINDOW = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""


class RedisWindows:
    """Moving windows in Redis under ``prefix``.

    Args:
        link: The Redis link (timeouts and breaker).
        prefix: Key prefix, e.g. ``tokenbroker:<namespace>:limit``.
    """

    def __init__(self, link: RedisLink, prefix: str) -> None:
        self.link = link
        self.prefix = prefix
        self._script = link.client.register_script(MOVING_WINDOW)

    def __repr__(self) -> str:
        return f"RedisWindows(prefix={self.prefix!r})"

    def hit(self, name: str, key: str, limit: int, window: float) -> float | None:
        """Count one hit of ``key`` in the window ``name``.

        Args:
            name: Which limit (``fail``, ``consumer``).
            key: Whose hits (a client address, a consumer name; never a secret).
            limit: Hits allowed per window.
            window: The window, in seconds.

        Returns:
            None when the hit was counted, else seconds until one is allowed again.

        Raises:
            CoordinationUnavailableError: Redis did not answer (or the breaker is open).
        """
        redis_key = f"{self.prefix}:{name}:{key}"
        member = uuid.uuid4().hex
        millis = max(1, int(window * 1000))

        async def run(client: Redis) -> object:
            return await self._script(keys=[redis_key], args=[limit, millis, member], client=client)

        wait = self.link.call(run)
        return None if not wait else int(str(wait)) / 1000

    async def ahit(self, name: str, key: str, limit: int, window: float) -> float | None:
        """:meth:`hit` for a caller on an event loop: never blocks the loop, and gives up
        after the link's budget (:meth:`RedisLink.acall`).

        Raises:
            CoordinationUnavailableError: Redis did not answer within the budget, failed, or
                the breaker is open.
        """
        redis_key = f"{self.prefix}:{name}:{key}"
        member = uuid.uuid4().hex
        millis = max(1, int(window * 1000))

        async def run(client: Redis) -> object:
            return await self._script(keys=[redis_key], args=[limit, millis, member], client=client)

        wait = await self.link.acall(run)
        return None if not wait else int(str(wait)) / 1000
