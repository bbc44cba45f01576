"""The usage ledger on SQLite: exact quotas and rates, releases, windows, and no token over quota when several
processes and threads reserve at once; the billing report counts the granted tokens (issue 6)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert

from stampd.access import Quota, Reservation, Subscriber
from stampd.errors import RecordingError, TooManyRequests
from stampd.records.migrate import upgrade
from stampd.records.schema import tokens, usage_counters
from stampd.records.store import RecordStore
from stampd.records.usage import SqlUsageLedger, UsageRow, expired_before, open_usage_ledger, usage_report

NOW = 1_795_305_570_250_000
"""2026-11-21T23:59:30.25Z"""
S = 1_000_000


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture
def ledger(url: str) -> Iterator[SqlUsageLedger]:
    ledger = SqlUsageLedger(url)
    yield ledger
    asyncio.run(ledger.close())


async def attempts(ledger: SqlUsageLedger, subscriber: Subscriber, times: list[int]) -> list[Reservation | int]:
    """Reserve once at each instant, one after the other: the reservation, or the Retry-After of a 429."""
    outcomes: list[Reservation | int] = []
    for now in times:
        try:
            outcomes.append(await ledger.reserve(subscriber, now))
        except TooManyRequests as e:
            outcomes.append(e.retry_after_s)
    return outcomes


def test_exact_quota_then_429_until_the_window_resets(ledger: SqlUsageLedger) -> None:
    subscriber = Subscriber("alice", quotas=(Quota(3, "day"),))
    outcomes = asyncio.run(attempts(ledger, subscriber, [NOW + i * S for i in range(5)]))
    assert outcomes[:3] == [Reservation("alice", ("day:2026-11-21",))] * 3
    assert outcomes[3:] == [27, 26]  # 26.75 s and 25.75 s until midnight UTC, rounded up
    assert ledger.counts("alice") == {"day:2026-11-21": 3}  # refused requests counted nothing
    next_day = asyncio.run(attempts(ledger, subscriber, [NOW + 30 * S]))
    assert next_day == [Reservation("alice", ("day:2026-11-22",))]


def test_exact_rate_per_second(ledger: SqlUsageLedger) -> None:
    subscriber = Subscriber("bob", rate_per_s=2)
    outcomes = asyncio.run(attempts(ledger, subscriber, [NOW, NOW + 1, NOW + 2, NOW + S]))
    assert outcomes[2] == 1  # Retry-After at least 1 s
    assert [o for o in outcomes if isinstance(o, Reservation)] == [
        Reservation("bob", ("s:1795305570",)),
        Reservation("bob", ("s:1795305570",)),
        Reservation("bob", ("s:1795305571",)),
    ]


def test_a_full_rate_window_takes_nothing_from_the_quota(ledger: SqlUsageLedger) -> None:
    """All counters or none: a request refused for its rate does not spend quota."""
    subscriber = Subscriber("carol", quotas=(Quota(10, "month"), Quota(4, "total")), rate_per_s=2)
    outcomes = asyncio.run(attempts(ledger, subscriber, [NOW] * 5))
    assert [isinstance(o, Reservation) for o in outcomes] == [True, True, False, False, False]
    assert ledger.counts("carol") == {"month:2026-11": 2, "total": 2, "s:1795305570": 2}
    later = asyncio.run(attempts(ledger, subscriber, [NOW + S, NOW + S, NOW + 2 * S]))
    assert later[:2] == [Reservation("carol", ("month:2026-11", "total", "s:1795305571"))] * 2
    with pytest.raises(TooManyRequests, match="total quota spent") as spent:
        asyncio.run(ledger.reserve(subscriber, NOW + 3 * S))
    assert spent.value.retry_after_s == 86400


def test_release_gives_the_token_back(ledger: SqlUsageLedger) -> None:
    subscriber = Subscriber("dave", quotas=(Quota(1, "hour"),), rate_per_s=5)

    async def scenario() -> None:
        reservation = await ledger.reserve(subscriber, NOW)
        with pytest.raises(TooManyRequests):
            await ledger.reserve(subscriber, NOW)
        await ledger.release(reservation)  # e.g. the TSU answered a rejection: not granted, not counted
        await ledger.reserve(subscriber, NOW)
        await ledger.release(reservation)
        await ledger.release(reservation)  # never below zero
        await ledger.release(Reservation("dave", ("hour:1999-01-01T00",)))  # a counter that is not there

    asyncio.run(scenario())
    assert ledger.counts("dave") == {"hour:2026-11-21T23": 0, "s:1795305570": 0}


def test_a_subscriber_without_limits_touches_no_counter(ledger: SqlUsageLedger) -> None:
    reservation = asyncio.run(ledger.reserve(Subscriber("free"), NOW))
    assert reservation == Reservation("free", ())
    asyncio.run(ledger.release(reservation))
    assert ledger.counts("free") == {}


def test_old_rate_windows_are_purged(url: str) -> None:
    ledger = SqlUsageLedger(url)
    subscriber = Subscriber("erin", quotas=(Quota(100, "day"),), rate_per_s=5)
    asyncio.run(attempts(ledger, subscriber, [NOW, NOW + S, NOW + 120 * S]))
    asyncio.run(ledger.close())  # waits for the purge
    assert SqlUsageLedger(url).counts("erin") == {"day:2026-11-21": 2, "day:2026-11-22": 1, "s:1795305690": 1}


def test_expired_calendar_windows_are_purged_but_never_total(url: str) -> None:
    """SPEC issue 6 (quotas): hour, day and month counters are deleted once their window ended at least one whole
    window ago (a release may still come for the window that just ended); ``total`` stays for good."""
    kept = {
        "hour:2026-11-21T22": 4,  # the previous hour: ended 30 s ago
        "hour:2026-11-21T23": 5,
        "day:2026-11-20": 6,
        "day:2026-11-21": 7,
        "month:2026-10": 8,
        "month:2026-11": 9,
        "total": 10,
        "s:1795305568": 1,  # two seconds ago
    }
    expired = {"hour:2026-11-21T21": 1, "hour:2025-12-31T23": 1, "day:2026-11-19": 1, "month:2026-09": 1,
               "month:2025-12": 1, "s:1795305567": 1}  # fmt: skip
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(usage_counters),
            [{"subscriber": "old", "window": w, "count": c} for w, c in {**kept, **expired}.items()],
        )
    engine.dispose()
    ledger = SqlUsageLedger(url)
    asyncio.run(ledger.reserve(Subscriber("new", quotas=(Quota(1, "total"),)), NOW))  # the first one purges
    asyncio.run(ledger.close())  # waits for the purge
    assert SqlUsageLedger(url).counts("old") == kept


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        ("2026-11-21T23:59:30", {"hour": "hour:2026-11-21T22", "day": "day:2026-11-20", "month": "month:2026-10"}),
        ("2026-01-01T00:00:00", {"hour": "hour:2025-12-31T23", "day": "day:2025-12-31", "month": "month:2025-12"}),
        ("2024-03-01T00:30:00", {"hour": "hour:2024-02-29T23", "day": "day:2024-02-29", "month": "month:2024-02"}),
    ],
)
def test_the_first_window_kept_is_the_previous_one(instant: str, expected: dict[str, str]) -> None:
    now_us = int(datetime.fromisoformat(instant).replace(tzinfo=UTC).timestamp()) * S
    assert expired_before(now_us) == expected


def test_a_changed_quota_applies_to_the_current_windows_count(ledger: SqlUsageLedger) -> None:
    """SPEC issue 6 (quotas): `stampd subscribers update --quota` keeps the window's count; a limit lowered below
    it refuses until the window resets, a raised one grants the difference."""
    before = Subscriber("frank", quotas=(Quota(5, "day"),))
    assert all(isinstance(o, Reservation) for o in asyncio.run(attempts(ledger, before, [NOW] * 3)))
    lowered = Subscriber("frank", quotas=(Quota(2, "day"),))
    assert asyncio.run(attempts(ledger, lowered, [NOW + S])) == [29]  # 28.75 s until midnight UTC
    assert ledger.counts("frank") == {"day:2026-11-21": 3}
    raised = Subscriber("frank", quotas=(Quota(4, "day"),))
    outcomes = asyncio.run(attempts(ledger, raised, [NOW + S, NOW + S]))
    assert outcomes == [Reservation("frank", ("day:2026-11-21",)), 29]
    assert ledger.counts("frank") == {"day:2026-11-21": 4}
    assert asyncio.run(attempts(ledger, lowered, [NOW + 30 * S])) == [Reservation("frank", ("day:2026-11-22",))]


def test_a_batch_grants_what_fits_and_refuses_the_rest(ledger: SqlUsageLedger) -> None:
    """Reservations arriving together share one transaction; in it each is all or none on its own: the ones that
    find a full counter undo only their own increments, and the others are granted (issue 6: exact quotas)."""
    alice = Subscriber("alice", quotas=(Quota(3, "day"),))
    bob = Subscriber("bob", rate_per_s=2)
    carol = Subscriber("carol", quotas=(Quota(100, "month"), Quota(2, "total")))

    async def one(subscriber: Subscriber) -> str:
        try:
            await ledger.reserve(subscriber, NOW)
        except TooManyRequests as e:
            return f"429 {e.retry_after_s}"
        return "granted"

    async def together() -> list[str]:
        return await asyncio.gather(*(one(s) for s in [alice, bob, carol] * 5))

    before = ledger.transactions
    outcomes = asyncio.run(together())
    assert ledger.transactions == before + 1  # fifteen reservations, one commit
    assert outcomes[0::3] == ["granted"] * 3 + ["429 30"] * 2  # the day ends in 29.75 s
    assert outcomes[1::3] == ["granted"] * 2 + ["429 1"] * 3
    assert outcomes[2::3] == ["granted"] * 2 + ["429 86400"] * 3
    assert ledger.counts("alice") == {"day:2026-11-21": 3}
    assert ledger.counts("bob") == {"s:1795305570": 2}
    # carol's refused reservations had incremented her month before finding the total spent: undone
    assert ledger.counts("carol") == {"month:2026-11": 2, "total": 2}


def test_releases_are_batched_with_reservations(ledger: SqlUsageLedger) -> None:
    subscriber = Subscriber("dora", quotas=(Quota(2, "hour"),))

    async def scenario() -> list[str]:
        first = await ledger.reserve(subscriber, NOW)
        await ledger.reserve(subscriber, NOW)
        before = ledger.transactions
        outcomes = await asyncio.gather(
            ledger.release(first), ledger.release(first), ledger.reserve(subscriber, NOW), return_exceptions=True
        )
        assert ledger.transactions == before + 1
        return [type(o).__name__ for o in outcomes]

    # sorted by subscriber and window, the batch runs in arrival order: two releases, then the reservation fits
    assert asyncio.run(scenario()) == ["NoneType", "NoneType", "Reservation"]
    assert ledger.counts("dora") == {"hour:2026-11-21T23": 1}


def test_a_failed_commit_fails_every_caller_of_its_batch_and_counts_nothing(
    ledger: SqlUsageLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is one transaction: if its COMMIT fails, nobody in it is told "granted", and nothing is counted."""
    subscribers = [Subscriber(name, quotas=(Quota(10, "day"),), rate_per_s=5) for name in ("erin", "fred")]
    kept = asyncio.run(ledger.reserve(subscribers[0], NOW))

    def fail(_connection: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def together() -> list[BaseException | Reservation | None]:
        return await asyncio.gather(
            *(ledger.reserve(s, NOW) for s in subscribers * 3), ledger.release(kept), return_exceptions=True
        )

    monkeypatch.setattr(SqlUsageLedger, "_commit", staticmethod(fail))
    outcomes = asyncio.run(together())
    assert len(outcomes) == 7
    assert all(isinstance(o, RecordingError) and "disk I/O error" in str(o) for o in outcomes), outcomes
    assert "failed to release" in str(outcomes[-1])
    assert ledger.counts("erin") == {"day:2026-11-21": 1, "s:1795305570": 1}  # only the reservation before
    assert ledger.counts("fred") == {}
    monkeypatch.undo()
    asyncio.run(ledger.reserve(subscribers[1], NOW))  # the next batch, on a new connection, works
    assert ledger.counts("fred") == {"day:2026-11-21": 1, "s:1795305570": 1}


def test_the_ledger_commits_without_its_own_fsync_on_sqlite(ledger: SqlUsageLedger, url: str) -> None:
    """synchronous=NORMAL on the ledger's connection only (see _sync_normal): the token store keeps FULL."""
    with ledger._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store = RecordStore(url)
    with store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def _hammer(url: str, subscriber: Subscriber, times: int, start: Any, granted: Any) -> None:
    """One process: ``times`` concurrent reservations through its own ledger; puts how many were granted."""

    async def run() -> int:
        ledger = SqlUsageLedger(url)

        async def one() -> bool:
            try:
                await ledger.reserve(subscriber, NOW)
            except TooManyRequests:
                return False
            return True

        granted = sum(await asyncio.gather(*(one() for _ in range(times))))
        await ledger.close()
        return granted

    start.wait(10)
    granted.put(asyncio.run(run()))


@pytest.mark.parametrize(
    ("subscriber", "counter"),
    [
        (Subscriber("busy", quotas=(Quota(37, "day"),)), "day:2026-11-21"),
        (Subscriber("busy", rate_per_s=11), "s:1795305570"),
    ],
)
def test_processes_and_threads_never_exceed_the_limit(url: str, subscriber: Subscriber, counter: str) -> None:
    """4 processes x 25 concurrent reservations (batched, in one transaction per batch) on one SQLite file:
    exactly the limit."""
    limit = subscriber.quotas[0].limit if subscriber.quotas else subscriber.rate_per_s
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=_hammer, args=(url, subscriber, 25, start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    start.set()
    granted = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(10)
        assert process.exitcode == 0
    assert sum(granted) == limit
    assert SqlUsageLedger(url).counts("busy") == {counter: limit}


def test_open_usage_ledger(url: str) -> None:
    ledger = open_usage_ledger("records", url)
    assert isinstance(ledger, SqlUsageLedger)
    asyncio.run(ledger.close())
    with pytest.raises(ValueError, match="unknown usage ledger 'memcached://x'"):
        open_usage_ledger("memcached://x", url)


def _token_row(serial: int, gen_time_us: int, tsu: str, subscriber: str | None) -> dict[str, object]:
    return {
        "serial": format(serial, "x"),
        "gen_time": "20261121000000Z",
        "gen_time_us": gen_time_us,
        "tsu": tsu,
        "policy": "1.2.3",
        "hash_oid": "2.16.840.1.101.3.4.2.1",
        "imprint": bytes(32),
        "token": b"\x30\x00",
        "subscriber": subscriber,
    }


def test_usage_report_counts_granted_tokens(url: str) -> None:
    day = 86400 * S
    start = 1_793_491_200 * S  # 2026-11-01T00:00:00Z
    rows = [
        _token_row(1, start - 1, "default", "alice"),  # October
        _token_row(2, start, "default", "alice"),
        _token_row(3, start + day, "default", "alice"),
        _token_row(4, start + 2 * day, "gold", "alice"),
        _token_row(5, start + 3 * day, "default", "bob"),
        _token_row(6, start + 4 * day, "default", None),  # a public TSU's anonymous token is not billed
        _token_row(7, start + 30 * day, "default", "bob"),  # December
    ]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(tokens), rows)
    engine.dispose()
    november = usage_report(url, start, start + 30 * day)
    assert november == [
        UsageRow("alice", "default", 2, start, start + day),
        UsageRow("alice", "gold", 1, start + 2 * day, start + 2 * day),
        UsageRow("bob", "default", 1, start + 3 * day, start + 3 * day),
    ]
    assert usage_report(url, start, start + 30 * day, "bob") == [november[2]]
    assert usage_report(url, start, start + 30 * day, "nobody") == []
