"""Usage counting in Redis (``[access] ledger = "redis://..."``): exact across processes and nodes, because each
reservation is one Lua script, which Redis runs atomically (issue 6: quotas and rate limits).

Reservations and releases are pipelined, as the records ledger groups them into transactions
(:mod:`stampd.records.usage`): those that arrive together (one event-loop iteration) go to Redis in ONE pipeline
of script calls, one round trip for all of them. Each is still its own script call, all or nothing, so exactness
across processes does not depend on the batching; each caller gets its own script's answer. A pipeline that fails
(connection lost, Redis down) fails all of its callers; a script error fails only its own caller.

Keys are ``<prefix>{<subscriber>}:<window>``: the braces are a Redis Cluster hash tag, so all the counters of one
subscriber live in one slot and one script may touch them together. Each counter expires a day after its window
ends (a release may still come for it until then), a rate's counter a minute after its second; ``total`` never
expires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from stampd.access import Reservation, Subscriber, over_limit, usage_limits
from stampd.errors import RecordingError
from stampd.records.engine import mask_url

KEEP_AFTER_WINDOW_S = 86400
"""How long a quota's counter outlives its window."""
KEEP_AFTER_SECOND_S = 60
"""How long a rate counter outlives its second: one key per subscriber per second would otherwise pile up for a
day. Releases come within a request's lifetime; one that finds its counter gone changes nothing."""

DEFAULT_PREFIX = "stampd:usage:"
MAX_CONNECTIONS = 16
"""Connections to Redis per process (per worker)."""
MAX_BATCH = 512
"""Reservations and releases per pipeline at most."""
MAX_PIPELINES_IN_FLIGHT = 4
"""Pipelines one process has in flight at once; what arrives meanwhile waits and goes in the next one, so under
load the batches grow instead of the round trips multiplying."""

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


@dataclass(slots=True)
class _Operation:
    """A reservation (``arguments``: those of the reserve script) or a release (none) waiting for its pipeline;
    ``done`` receives the script's answer (a reservation's: 0 when it fitted, else the index of the full counter)."""

    keys: list[str]
    arguments: list[int]
    done: asyncio.Future[int] = field(repr=False)

    @property
    def is_reservation(self) -> bool:
        return bool(self.arguments)


class RedisUsageLedger:
    """The :class:`~stampd.access.UsageLedger` on Redis. The client connects lazily, on the event loop that first
    uses it (each worker process has its own)."""

    def __init__(self, url: str, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        try:
            # A bounded pool that waits for a free connection: a burst of requests queues instead of failing.
            pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=10)
            self._redis: Any = redis.asyncio.Redis.from_pool(pool)
        except (ValueError, RedisError) as e:
            raise RecordingError(f"cannot use the usage ledger at {mask_url(url)}: {e}") from e
        self._prefix = key_prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._pending: list[_Operation] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self.pipelines = 0
        """Pipelines sent so far (diagnostics: it shows how well reservations are grouped)."""

    def key(self, subscriber: str, window: str) -> str:
        return f"{self._prefix}{{{subscriber}}}:{window}"

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        limits = usage_limits(subscriber, now_us)
        if not limits:
            return Reservation(subscriber.name)
        arguments: list[int] = []
        for limit in limits:
            keep = KEEP_AFTER_SECOND_S if limit.window.startswith("s:") else KEEP_AFTER_WINDOW_S
            expire = 0 if limit.resets_at_us is None else limit.resets_at_us // 1_000_000 + keep
            arguments += [limit.limit, expire]
        full = await self._submit([self.key(subscriber.name, w.window) for w in limits], arguments)
        if full:
            raise over_limit(subscriber, limits[full - 1], now_us)
        return Reservation(subscriber.name, tuple(w.window for w in limits))

    async def release(self, reservation: Reservation) -> None:
        if reservation.windows:
            await self._submit([self.key(reservation.subscriber, w) for w in reservation.windows], [])

    # --- pipelining ---

    def _submit(self, keys: list[str], arguments: list[int]) -> asyncio.Future[int]:
        """Queue one script call for the next pipeline; the future of its answer."""
        loop = asyncio.get_running_loop()
        operation = _Operation(keys, arguments, loop.create_future())
        self._pending.append(operation)
        if not self._flush_scheduled and len(self._in_flight) < MAX_PIPELINES_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the other requests ready in this iteration have queued theirs
        return operation.done

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and len(self._in_flight) < MAX_PIPELINES_IN_FLIGHT:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            running = asyncio.get_running_loop().create_task(self._send(batch))
            self._in_flight.add(running)
            running.add_done_callback(self._sent)

    def _sent(self, running: asyncio.Task[None]) -> None:
        self._in_flight.discard(running)
        if self._pending:
            self._flush()

    async def _send(self, batch: list[_Operation]) -> None:
        """Run a batch as one pipeline and answer each of its callers; never raises (a failure goes to them)."""
        try:
            answers = await self._pipeline(batch)
            unknown = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
            if unknown:  # the scripts were flushed (or Redis restarted): those calls did not run; load and rerun
                await self._redis.script_load(_RESERVE)
                await self._redis.script_load(_RELEASE)
                rerun = await self._pipeline([batch[i] for i in unknown])
                for i, answer in zip(unknown, rerun, strict=True):
                    answers[i] = answer
        except asyncio.CancelledError:  # the ledger is being torn down: its callers must not wait forever
            for operation in batch:
                operation.done.cancel()
            raise
        except Exception as e:  # the whole pipeline failed (connection lost, Redis down): each of its callers
            for operation in batch:
                _fail(operation, e)
            return
        self.pipelines += 1
        for operation, answer in zip(batch, answers, strict=True):
            if isinstance(answer, Exception):
                _fail(operation, answer)
            elif not operation.done.done():
                operation.done.set_result(int(answer))

    async def _pipeline(self, batch: Sequence[_Operation]) -> list[Any]:
        """One round trip: each operation's script by its SHA; a failed call's answer is its exception."""
        pipe = self._redis.pipeline(transaction=False)
        for operation in batch:
            script = self._reserve if operation.is_reservation else self._release
            pipe.evalsha(script.sha, len(operation.keys), *operation.keys, *operation.arguments)
        return list(await pipe.execute(raise_on_error=False))

    async def counts(self, subscriber: str, windows: list[str]) -> dict[str, int]:
        """The counters of ``subscriber`` in ``windows`` (absent ones are 0)."""
        values = await self._redis.mget([self.key(subscriber, w) for w in windows])
        return {w: int(v or 0) for w, v in zip(windows, values, strict=True)}

    async def close(self) -> None:
        """Finish the pipelines in flight and the operations still queued, then close."""
        while self._in_flight or self._pending:
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
            else:
                self._flush()
        await self._redis.aclose()


def _fail(operation: _Operation, error: Exception) -> None:
    """Answer ``operation`` with a RecordingError for a Redis error (any other exception is a bug: passed on)."""
    if operation.done.done():
        return
    if isinstance(error, RedisError):
        what = "reserve" if operation.is_reservation else "release a reservation"
        error = RecordingError(f"the usage ledger failed to {what}: {error}")
    operation.done.set_exception(error)

