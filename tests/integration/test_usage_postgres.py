"""The usage ledger and the subscribers on PostgreSQL: two OS processes reserving at once are granted exactly the
quota, and the migration's tables and the subscriber events work there too (issue 6)."""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)

from stampd.access import Quota, Subscriber
from stampd.records.audit import audit_records
from stampd.records.engine import records_url
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore
from stampd.records.subscribers import SubscriberStore
from stampd.records.usage import SqlUsageLedger

sys.path.insert(0, str(Path(__file__).parents[1]))
from usagetools import run_together

pytestmark = pytest.mark.integration

NOW = 1_795_305_570_250_000

HAMMER = textwrap.dedent(
    """
    import asyncio, sys
    from stampd.access import Quota, Subscriber
    from stampd.errors import TooManyRequests
    from stampd.records.usage import SqlUsageLedger

    async def main() -> None:
        ledger = SqlUsageLedger(sys.argv[1], threads=8)
        subscriber = Subscriber("busy", quotas=(Quota(int(sys.argv[2]), "month"),), rate_per_s=10**6)
        ledger.counts("busy")  # connected
        print("ready", flush=True)
        sys.stdin.readline()  # both processes start together

        async def client(attempts: int) -> int:
            granted = 0
            for _ in range(attempts):
                try:
                    await ledger.reserve(subscriber, int(sys.argv[3]))
                except TooManyRequests:
                    continue
                granted += 1
            return granted

        # 16 clients one request after the other: many small batches, so both processes' transactions interleave
        print(sum(await asyncio.gather(*(client(int(sys.argv[4]) // 16) for _ in range(16)))))
        await ledger.close()

    asyncio.run(main())
    """
)


def test_two_processes_get_exactly_the_quota(pg_url: str) -> None:  # noqa: F811
    upgrade(pg_url)
    limit, attempts = 301, 400
    granted = run_together(HAMMER, pg_url, str(limit), str(NOW), str(attempts))
    assert sum(granted) == limit  # 800 attempts, never one over
    assert all(g > 0 for g in granted), granted  # both really competed
    ledger = SqlUsageLedger(pg_url)
    assert ledger.counts("busy") == {"month:2026-11": limit, "s:1795305570": limit}
    asyncio.run(ledger.close())


def test_release_and_rate_on_postgresql(pg_url: str) -> None:  # noqa: F811
    upgrade(pg_url)
    ledger = SqlUsageLedger(pg_url)
    subscriber = Subscriber("p", quotas=(Quota(2, "total"),), rate_per_s=1)

    async def scenario() -> list[str]:
        first = await ledger.reserve(subscriber, NOW)
        refusals = []
        for now in (NOW, NOW + 1_000_000):
            try:
                await ledger.reserve(subscriber, now)
            except Exception as e:  # the test names what it got
                refusals.append(type(e).__name__)
        await ledger.release(first)
        await ledger.reserve(subscriber, NOW + 2_000_000)
        return refusals

    assert asyncio.run(scenario()) == ["TooManyRequests"]  # the rate; the second second fits
    assert ledger.counts("p")["total"] == 2
    asyncio.run(ledger.close())


def test_a_batch_on_postgresql_fits_some_and_fails_whole_at_commit(pg_url: str) -> None:  # noqa: F811
    """One transaction per batch on PostgreSQL too: the reservations that fit are granted, those that do not undo
    their own increments; and a COMMIT that fails (here a deferred constraint trigger, checked only at COMMIT)
    fails every caller of its batch and counts nothing (issue 6: exact quotas)."""
    upgrade(pg_url)
    engine = create_engine(records_url(pg_url))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'doomed may not be counted'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT OR UPDATE ON usage_counters "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.subscriber = 'doomed') "
            "EXECUTE FUNCTION refuse_doomed()"
        )
    engine.dispose()
    ledger = SqlUsageLedger(pg_url)
    ok = Subscriber("ok", quotas=(Quota(50, "day"), Quota(2, "total")))
    doomed = Subscriber("doomed", quotas=(Quota(5, "day"),))

    async def together(subscribers: list[Subscriber]) -> list[str]:
        outcomes = await asyncio.gather(*(ledger.reserve(s, NOW) for s in subscribers), return_exceptions=True)
        return [type(o).__name__ for o in outcomes]

    before = ledger.transactions
    assert asyncio.run(together([ok] * 4)) == ["Reservation"] * 2 + ["TooManyRequests"] * 2
    assert ledger.transactions == before + 1
    assert ledger.counts("ok") == {"day:2026-11-21": 2, "total": 2}  # the refused ones undid their day

    fine = Subscriber("fine", quotas=(Quota(5, "day"),))
    assert asyncio.run(together([doomed, fine, doomed, ok])) == ["RecordingError"] * 4
    assert ledger.counts("doomed") == {}
    assert ledger.counts("fine") == {}  # it fitted, but its batch did not commit
    assert asyncio.run(together([fine])) == ["Reservation"]  # the next batch, without doomed, commits
    assert ledger.counts("fine") == {"day:2026-11-21": 1}
    asyncio.run(ledger.close())


def test_subscribers_and_their_events_on_postgresql(pg_url: str) -> None:  # noqa: F811
    upgrade(pg_url)
    store = SubscriberStore(pg_url)
    alice = Subscriber("alice", networks=(ipaddress.ip_network("2001:db8::/32"),), token_sha256=b"\x01" * 32)
    store.add(alice)
    with pytest.raises(ValueError, match="already exists"):
        store.add(alice)
    with pytest.raises(ValueError, match="already used by subscriber alice"):
        store.add(Subscriber("bob", token_sha256=b"\x01" * 32))
    assert store.set_enabled("alice", False)
    assert store.get("alice") == Subscriber("alice", False, alice.networks, alice.token_sha256)
    assert store.load_directory().get("alice") is not None
    store.close()
    records = RecordStore(pg_url)
    kinds = [(e["kind"], e["detail"].get("name")) for e in records.events()]
    records.close()
    assert kinds == [("subscriber.added", "alice"), ("subscriber.disabled", "alice")]
    report = audit_records(pg_url, None)
    assert report.ok, report.problems
    assert [(c.table, c.count) for c in report.chains] == [("events", 2)]
