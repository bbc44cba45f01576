"""The usage ledger and the subscribers on PostgreSQL: two OS processes reserving at once are granted exactly the
quota, and the migration's tables and the subscriber events work there too (issue 6)."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import textwrap

import pytest
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)

from stampd.access import Quota, Subscriber
from stampd.records.audit import audit_records
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore
from stampd.records.subscribers import SubscriberStore
from stampd.records.usage import SqlUsageLedger

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

        async def one() -> bool:
            try:
                await ledger.reserve(subscriber, int(sys.argv[3]))
            except TooManyRequests:
                return False
            return True

        print(sum(await asyncio.gather(*(one() for _ in range(int(sys.argv[4]))))))
        await ledger.close()

    asyncio.run(main())
    """
)


def test_two_processes_get_exactly_the_quota(pg_url: str) -> None:  # noqa: F811
    upgrade(pg_url)
    limit, attempts = 301, 400
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, pg_url, str(limit), str(NOW), str(attempts)],
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
