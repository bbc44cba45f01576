"""Usage counting in Redis (``[access] ledger = "redis://..."``): exact across processes and nodes, because each
reservation is one Lua script, which Redis runs atomically (issue 6: quotas and rate limits).

Keys are ``<prefix>{<subscriber>}:<window>``: the braces are a Redis Cluster hash tag, so all the counters of one
subscriber live in one slot and one script may touch them together. Each counter expires a day after its window
ends (a release may still come for it until then); ``total`` never expires.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from stampd.access import Reservation, Subscriber, over_limit, usage_limits
from stampd.errors import RecordingError

KEEP_AFTER_WINDOW_S = 86400
"""How long a counter outlives its window."""

DEFAULT_PREFIX = "stampd:usage:"
MAX_CONNECTIONS = 16
"""Connections to Redis per process (per worker)."""

_RESERVE = """
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '0')
  if count >= tonumber(ARGV[2 * i - 1]) then
    return i
  end
end
for i, key in ipairs(KEYS) do
  redis.call('INCR', key)
  local expire_at = tonumber(ARGV[2 * i])
  if expire_at > 0 then
    redis.call('EXPIREAT', key, expire_at)
  end
end
return 0
"""
"""KEYS: the counters; ARGV: limit and expiry (epoch seconds, 0 for never) of each. Returns 0 when every counter
was incremented, else the 1-based index of the first full one (and increments nothing)."""

_RELEASE = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
return 0
"""


class RedisUsageLedger:
    """The :class:`~stampd.access.UsageLedger` on Redis. The client connects lazily, on the event loop that first
    uses it (each worker process has its own)."""

    def __init__(self, url: str, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        try:
            # A bounded pool that waits for a free connection: a burst of requests queues instead of failing.
            pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=10)
            self._redis: Any = redis.asyncio.Redis.from_pool(pool)
        except (ValueError, RedisError) as e:
            raise RecordingError(f"cannot use the usage ledger at {_shown(url)}: {e}") from e
        self._prefix = key_prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)

    def key(self, subscriber: str, window: str) -> str:
        return f"{self._prefix}{{{subscriber}}}:{window}"

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        limits = usage_limits(subscriber, now_us)
        if not limits:
            return Reservation(subscriber.name)
        arguments: list[int] = []
        for limit in limits:
            expire = 0 if limit.resets_at_us is None else limit.resets_at_us // 1_000_000 + KEEP_AFTER_WINDOW_S
            arguments += [limit.limit, expire]
        try:
            full = int(await self._reserve(keys=[self.key(subscriber.name, w.window) for w in limits], args=arguments))
        except RedisError as e:
            raise RecordingError(f"the usage ledger failed: {e}") from e
        if full:
            raise over_limit(subscriber, limits[full - 1], now_us)
        return Reservation(subscriber.name, tuple(w.window for w in limits))

    async def release(self, reservation: Reservation) -> None:
        if not reservation.windows:
            return
        try:
            await self._release(keys=[self.key(reservation.subscriber, w) for w in reservation.windows], args=[])
        except RedisError as e:
            raise RecordingError(f"the usage ledger failed to release a reservation: {e}") from e

    async def counts(self, subscriber: str, windows: list[str]) -> dict[str, int]:
        """The counters of ``subscriber`` in ``windows`` (absent ones are 0)."""
        values = await self._redis.mget([self.key(subscriber, w) for w in windows])
        return {w: int(v or 0) for w, v in zip(windows, values, strict=True)}

    async def close(self) -> None:
        await self._redis.aclose()


def _shown(url: str) -> str:
    """``url`` without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"
