"""The usage ledger on a real Redis (127.0.0.1:6379, or $STAMPD_TEST_REDIS): one Lua script per reservation, so
concurrent reservations from two processes never pass the quota (issue 6), and those that arrive together share
one pipeline. Each test uses keys under a prefix of its own and deletes them afterwards; without Redis these tests
fail rather than skip."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from stampd.access import Quota, Reservation, Subscriber
from stampd.errors import RecordingError, TooManyRequests
from stampd.records.redis_usage import RedisUsageLedger
from stampd.records.usage import open_usage_ledger

sys.path.insert(0, str(Path(__file__).parents[1]))
from usagetools import run_together

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("STAMPD_TEST_REDIS", "redis://127.0.0.1:6379/0")
NOW = 1_795_305_570_250_000
"""2026-11-21T23:59:30.25Z"""
S = 1_000_000


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"stampd-test:{secrets.token_hex(6)}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"no Redis at {REDIS_URL} (set STAMPD_TEST_REDIS): {e}")
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def run(ledger: RedisUsageLedger, scenario: object) -> object:
    async def main() -> object:
        try:
            return await scenario  # type: ignore[misc]
        finally:
            await ledger.close()

    return asyncio.run(main())


def test_quota_rate_release_and_expiry(prefix: str) -> None:
    ledger = RedisUsageLedger(REDIS_URL, key_prefix=prefix)
    subscriber = Subscriber("alice", quotas=(Quota(3, "day"), Quota(10, "total")), rate_per_s=2)
    client = redis.Redis.from_url(REDIS_URL)

    async def scenario() -> list[object]:
        outcomes: list[object] = []
        for now in (NOW, NOW, NOW, NOW + S, NOW + 2 * S):
            try:
                outcomes.append(await ledger.reserve(subscriber, now))
            except TooManyRequests as e:
                outcomes.append((str(e), e.retry_after_s))
        await ledger.release(outcomes[0])  # type: ignore[arg-type]
        outcomes.append(await ledger.counts("alice", ["day:2026-11-21", "total", "s:1795305570", "s:1795305572"]))
        return outcomes

    outcomes = run(ledger, scenario())
    assert outcomes == [
        Reservation("alice", ("day:2026-11-21", "total", "s:1795305570")),
        Reservation("alice", ("day:2026-11-21", "total", "s:1795305570")),
        ("subscriber alice: rate limit 2/s reached; it resets at 2026-11-21T23:59:31Z", 1),
        Reservation("alice", ("day:2026-11-21", "total", "s:1795305571")),
        ("subscriber alice: quota 3/day reached; it resets at 2026-11-22T00:00:00Z", 28),
        {"day:2026-11-21": 2, "total": 2, "s:1795305570": 1, "s:1795305572": 0},
    ]
    day_key = f"{prefix}{{alice}}:day:2026-11-21"
    assert client.expiretime(day_key) == 1_795_305_600 + 86400  # a day after its window ends
    assert client.expiretime(f"{prefix}{{alice}}:s:1795305571") == 1_795_305_572 + 60  # a rate's: a minute after
    assert client.ttl(f"{prefix}{{alice}}:total") == -1  # never expires
    client.close()


def test_a_spent_total_quota(prefix: str) -> None:
    ledger = RedisUsageLedger(REDIS_URL, key_prefix=prefix)
    subscriber = Subscriber("bob", quotas=(Quota(1, "total"),))

    async def scenario() -> TooManyRequests:
        await ledger.reserve(subscriber, NOW)
        with pytest.raises(TooManyRequests) as refused:
            await ledger.reserve(subscriber, NOW + 365 * 86400 * S)
        return refused.value

    refused = run(ledger, scenario())
    assert isinstance(refused, TooManyRequests)
    assert "total quota spent" in str(refused)
    assert refused.retry_after_s == 86400


HAMMER = textwrap.dedent(
    """
    import asyncio, sys
    from stampd.access import Quota, Subscriber
    from stampd.errors import TooManyRequests
    from stampd.records.redis_usage import RedisUsageLedger

    async def main() -> None:
        ledger = RedisUsageLedger(sys.argv[1], key_prefix=sys.argv[2])
        subscriber = Subscriber("busy", quotas=(Quota(int(sys.argv[3]), "month"),))
        await ledger.counts("busy", [])
        print("ready", flush=True)
        sys.stdin.readline()

        async def one() -> bool:
            try:
                await ledger.reserve(subscriber, int(sys.argv[4]))
            except TooManyRequests:
                return False
            return True

        granted = 0
        for _ in range(int(sys.argv[5])):  # rounds: each one pipeline, so both processes' pipelines interleave
            granted += sum(await asyncio.gather(*(one() for _ in range(int(sys.argv[6])))))
        assert ledger.pipelines == int(sys.argv[5]), ledger.pipelines
        print(granted)
        await ledger.close()

    asyncio.run(main())
    """
)


def test_two_processes_get_exactly_the_quota(prefix: str) -> None:
    """Each process sends 40 pipelines of 10 reservations: they interleave in Redis, and still exactly the quota
    is granted, because each reservation is its own atomic script call."""
    limit, rounds, per_round = 301, 40, 10
    granted = run_together(HAMMER, REDIS_URL, prefix, str(limit), str(NOW), str(rounds), str(per_round))
    assert sum(granted) == limit
    assert all(g > 0 for g in granted), granted
    client = redis.Redis.from_url(REDIS_URL)
    assert int(client.get(f"{prefix}{{busy}}:month:2026-11") or 0) == limit
    client.close()


def test_a_batch_where_some_fit_and_some_do_not(prefix: str) -> None:
    """Reservations and releases that arrive together go in one pipeline, in their order; each caller gets its
    own answer."""
    ledger = RedisUsageLedger(REDIS_URL, key_prefix=prefix)
    two_a_day = Subscriber("ann", quotas=(Quota(2, "day"),))
    one_a_second = Subscriber("ben", rate_per_s=1)
    unlimited = Subscriber("cat")
    once = Subscriber("dan", quotas=(Quota(1, "total"),))

    async def attempt(subscriber: Subscriber) -> object:
        try:
            return await ledger.reserve(subscriber, NOW)
        except TooManyRequests as e:
            return str(e)

    async def scenario() -> tuple[list[object], int, dict[str, int]]:
        held = await ledger.reserve(once, NOW)
        before = ledger.pipelines
        outcomes = await asyncio.gather(
            attempt(two_a_day),
            attempt(one_a_second),
            ledger.release(held),  # queued before dan's next reservation, so that one fits
            attempt(two_a_day),
            attempt(once),
            attempt(one_a_second),
            attempt(two_a_day),
            attempt(unlimited),
            attempt(once),
        )
        counts = {
            **await ledger.counts("ann", ["day:2026-11-21"]),
            **await ledger.counts("ben", ["s:1795305570"]),
            **await ledger.counts("dan", ["total"]),
        }
        return outcomes, ledger.pipelines - before, counts

    outcomes, pipelines, counts = run(ledger, scenario())  # type: ignore[misc]
    ann = Reservation("ann", ("day:2026-11-21",))
    assert outcomes == [
        ann,
        Reservation("ben", ("s:1795305570",)),
        None,
        ann,
        Reservation("dan", ("total",)),
        "subscriber ben: rate limit 1/s reached; it resets at 2026-11-21T23:59:31Z",
        "subscriber ann: quota 2/day reached; it resets at 2026-11-22T00:00:00Z",
        Reservation("cat"),
        "subscriber dan: total quota spent (1 tokens)",
    ]
    assert pipelines == 1  # the eight script calls of the batch in one round trip (cat's needs none)
    assert counts == {"day:2026-11-21": 2, "s:1795305570": 1, "total": 1}


def test_scripts_flushed_from_redis_are_loaded_again(prefix: str) -> None:
    """After SCRIPT FLUSH (or a Redis restart) every call of a pipeline answers NOSCRIPT without running: the
    ledger loads the scripts and runs those calls again, once each."""
    ledger = RedisUsageLedger(REDIS_URL, key_prefix=prefix)
    subscriber = Subscriber("eve", quotas=(Quota(3, "total"),))
    client = redis.Redis.from_url(REDIS_URL)

    async def attempt() -> bool:
        try:
            await ledger.reserve(subscriber, NOW)
        except TooManyRequests:
            return False
        return True

    async def scenario() -> tuple[list[bool], list[bool], dict[str, int]]:
        first = await ledger.reserve(subscriber, NOW)
        client.script_flush()
        granted = await asyncio.gather(attempt(), ledger.release(first), attempt(), attempt())
        client.script_flush()
        more = await asyncio.gather(attempt(), attempt())
        return granted, more, await ledger.counts("eve", ["total"])

    granted, more, counts = run(ledger, scenario())  # type: ignore[misc]
    client.close()
    assert granted == [True, None, True, True]
    assert more == [False, False]
    assert counts == {"total": 3}


class Proxy:
    """A TCP relay to Redis that can be cut (every connection dropped, nothing listening) and restored on the
    same port: a Redis that goes away and comes back, without touching the shared Redis."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{REDIS_URL.rsplit('/', 1)[1]}"

    async def start(self) -> None:
        target = REDIS_URL.split("://", 1)[1].split("/", 1)[0]
        host, _, port = target.rpartition(":")

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def accept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            self._relays.add(asyncio.current_task())  # type: ignore[arg-type]
            redis_reader, redis_writer = await asyncio.open_connection(host, int(port))
            self._writers += [client_writer, redis_writer]
            await asyncio.gather(relay(client_reader, redis_writer), relay(redis_reader, client_writer))

        self._server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await asyncio.gather(*self._relays, return_exceptions=True)
        self._relays.clear()
        await self._server.wait_closed()


def test_a_redis_failure_fails_the_callers_of_its_batch(prefix: str) -> None:
    """A pipeline that cannot reach Redis fails each of its callers with RecordingError and counts nothing; the
    batches before and after it are answered normally."""
    proxy = Proxy()
    subscriber = Subscriber("fay", quotas=(Quota(10, "day"),), rate_per_s=100)

    async def scenario() -> tuple[list[object], list[object], list[object], dict[str, int]]:
        await proxy.start()
        ledger = RedisUsageLedger(proxy.url, key_prefix=prefix)
        try:
            before = await asyncio.gather(*(ledger.reserve(subscriber, NOW) for _ in range(3)))
            await proxy.cut()
            during = await asyncio.gather(
                ledger.reserve(subscriber, NOW),
                ledger.release(before[0]),
                ledger.reserve(subscriber, NOW),
                return_exceptions=True,
            )
            await proxy.start()
            after = await asyncio.gather(ledger.release(before[0]), ledger.reserve(subscriber, NOW))
            return before, during, after, await ledger.counts("fay", ["day:2026-11-21", "s:1795305570"])
        finally:
            await ledger.close()
            await proxy.cut()

    before, during, after, counts = asyncio.run(scenario())
    fay = Reservation("fay", ("day:2026-11-21", "s:1795305570"))
    assert before == [fay] * 3
    assert [type(e) for e in during] == [RecordingError] * 3
    assert [str(e).split(":")[0] for e in during] == [
        "the usage ledger failed to reserve",
        "the usage ledger failed to release a reservation",
        "the usage ledger failed to reserve",
    ]
    assert after == [None, fay]
    assert counts == {"day:2026-11-21": 3, "s:1795305570": 3}  # 3 reserved, none of the failed batch, -1 +1


def test_open_usage_ledger_and_an_unreachable_redis(prefix: str) -> None:
    ledger = open_usage_ledger(REDIS_URL, "sqlite:///unused.sqlite3")
    assert isinstance(ledger, RedisUsageLedger)
    run(ledger, asyncio.sleep(0))
    away = RedisUsageLedger("redis://:hunter2@127.0.0.1:1/0", key_prefix=prefix)  # nothing listens on port 1

    async def scenario() -> None:
        failed = await asyncio.gather(
            away.reserve(Subscriber("c", rate_per_s=1), NOW),
            away.release(Reservation("c", ("s:1795305570",))),
            away.reserve(Subscriber("d", rate_per_s=1), NOW),
            return_exceptions=True,
        )
        for error in failed:  # one batch: each of its callers gets the error
            assert isinstance(error, RecordingError)
            assert str(error).startswith("the usage ledger failed")
            assert "hunter2" not in str(error)

    run(away, scenario())
