"""The usage ledger on a real Redis (127.0.0.1:6379, or $STAMPD_TEST_REDIS): one Lua script per reservation, so
concurrent reservations from two processes never pass the quota (issue 6). Each test uses keys under a prefix of
its own and deletes them afterwards; without Redis these tests fail rather than skip."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import redis

from stampd.access import Quota, Reservation, Subscriber
from stampd.errors import RecordingError, TooManyRequests
from stampd.records.redis_usage import RedisUsageLedger
from stampd.records.usage import open_usage_ledger

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

        print(sum(await asyncio.gather(*(one() for _ in range(int(sys.argv[5]))))))
        await ledger.close()

    asyncio.run(main())
    """
)


def test_two_processes_get_exactly_the_quota(prefix: str) -> None:
    limit, attempts = 301, 400
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, REDIS_URL, prefix, str(limit), str(NOW), str(attempts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    granted = [int(o) for o in outputs]
    assert sum(granted) == limit
    assert all(g > 0 for g in granted), granted
    client = redis.Redis.from_url(REDIS_URL)
    assert int(client.get(f"{prefix}{{busy}}:month:2026-11") or 0) == limit
    client.close()


def test_open_usage_ledger_and_an_unreachable_redis(prefix: str) -> None:
    ledger = open_usage_ledger(REDIS_URL, "sqlite:///unused.sqlite3")
    assert isinstance(ledger, RedisUsageLedger)
    run(ledger, asyncio.sleep(0))
    away = RedisUsageLedger("redis://:hunter2@127.0.0.1:1/0", key_prefix=prefix)  # nothing listens on port 1

    async def scenario() -> None:
        with pytest.raises(RecordingError, match="the usage ledger failed") as failed:
            await away.reserve(Subscriber("c", rate_per_s=1), NOW)
        assert "hunter2" not in str(failed.value)

    run(away, scenario())
