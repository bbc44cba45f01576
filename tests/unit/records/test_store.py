"""The SQL record store: group commit, look-ups, and no token answered without a committed record (SPEC OPS-09)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from stampd.errors import RecordingError
from stampd.metrics import REGISTRY
from stampd.model import TokenRecord
from stampd.records import store as store_module
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore, serial_key


def record(serial: int, imprint: bytes = b"\x01" * 32, nonce: int | None = 7) -> TokenRecord:
    return TokenRecord(
        serial=serial,
        gen_time_ns=1772366400_123_000_000,
        gen_time="20260301120000.123Z",
        tsu="default",
        policy="2.25.7",
        hash_oid="2.16.840.1.101.3.4.2.1",
        imprint=imprint,
        nonce=nonce,
        token=b"\x30\x03" + serial.to_bytes(20, "big"),
        requester="::1",
    )


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    upgrade(url)
    s = RecordStore(url)
    yield s
    s.close()


async def record_all(store: RecordStore, records: list[TokenRecord]) -> list[BaseException | None]:
    return await asyncio.gather(*(store.record(r) for r in records), return_exceptions=True)


def test_concurrent_records_are_committed_and_read_back(store: RecordStore, tmp_path: Path) -> None:
    records = [record(2**159 + i, imprint=bytes([i % 7]) * 32, nonce=None if i % 2 else -i) for i in range(1000)]
    assert asyncio.run(record_all(store, records)) == [None] * 1000
    with sqlite3.connect(tmp_path / "records.sqlite3") as db:
        assert db.execute("select count(*) from tokens").fetchone() == (1000,)
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
    assert store.token_by_serial(2**159 + 5) == records[5]
    assert store.token_by_serial(12345) is None
    found = store.tokens_by_imprint(bytes([3]) * 32)
    assert {r.serial for r in found} == {2**159 + i for i in range(1000) if i % 7 == 3}


class SlowCommitter(ThreadPoolExecutor):
    """The store's commit thread, with every COMMIT held back a little and counted: while one is in flight, the
    records that arrive queue up for the next transaction."""

    HOLD_S = 0.01

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def held() -> Any:
            time.sleep(self.HOLD_S)
            result = fn(*args, **kwargs)
            with self._lock:
                self.commits += 1
            return result

        return super().submit(held)


@pytest.fixture
def slow_commits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[RecordStore, list[SlowCommitter]]]:
    committers: list[SlowCommitter] = []

    def make(*args: Any, **kwargs: Any) -> SlowCommitter:
        committers.append(SlowCommitter(*args, **kwargs))
        return committers[-1]

    monkeypatch.setattr(store_module, "ThreadPoolExecutor", make)
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    upgrade(url)
    s = RecordStore(url)
    yield s, committers
    s.close()


def _batches() -> tuple[float, float]:
    """(committed transactions, records in them) so far, from the stampd_record_batch_size histogram."""
    count = REGISTRY.get_sample_value("stampd_record_batch_size_count")
    total = REGISTRY.get_sample_value("stampd_record_batch_size_sum")
    return count or 0.0, total or 0.0


def test_concurrent_records_share_transactions_and_wait_for_their_commit_ops_09(
    slow_commits: tuple[RecordStore, list[SlowCommitter]], tmp_path: Path
) -> None:
    """Group commit: 200 requests arriving over about 100 ms, while each COMMIT takes at least 10 ms, are
    recorded in far fewer transactions than records (counted at the commit thread and by the batch-size
    histogram); and no request is answered before the transaction holding its record has committed: at the
    moment each `record` returns, another connection already reads the row."""
    store, (committer,) = slow_commits
    path = tmp_path / "records.sqlite3"
    records = [record(2**150 + i, imprint=bytes([i % 5]) * 32) for i in range(200)]
    unseen: list[int] = []

    async def arrive(i: int, r: TokenRecord) -> None:
        await asyncio.sleep(i * 0.0005)  # spread over several commits, not all in one loop iteration
        await store.record(r)
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as reader:
            row = reader.execute("select 1 from tokens where serial = ?", (serial_key(r.serial),)).fetchone()
        reader.close()
        if row is None:
            unseen.append(r.serial)

    async def run() -> None:
        await asyncio.gather(*(arrive(i, r) for i, r in enumerate(records)))

    batches_before, records_before = _batches()
    asyncio.run(run())
    batches, recorded = _batches()
    assert unseen == []
    assert recorded - records_before == 200
    assert batches - batches_before == committer.commits
    assert 1 < committer.commits < 200 / 10, committer.commits
    assert all(store.token_by_serial(r.serial) == r for r in records)
    with sqlite3.connect(path) as db:
        assert db.execute("select count(*), count(distinct seq), max(seq) from tokens").fetchone() == (200, 200, 200)
    db.close()


def test_duplicate_serial_fails_only_that_token_tst_04(store: RecordStore) -> None:
    asyncio.run(record_all(store, [record(1)]))
    outcomes = asyncio.run(record_all(store, [record(2), record(1), record(3)]))
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RecordingError)
    assert store.token_by_serial(1) == record(1)


def test_a_failing_database_fails_every_waiting_request(store: RecordStore, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "records.sqlite3") as db:
        db.execute("create trigger refuse before insert on tokens begin select raise(abort, 'refused'); end")
    outcomes = asyncio.run(record_all(store, [record(10), record(11)]))
    assert all(isinstance(o, RecordingError) for o in outcomes)
    assert store.token_by_serial(10) is None


def test_events_are_recorded_in_order(store: RecordStore) -> None:
    store.record_event("service.started", {"pid": 1})
    store.record_event("service.stopped", {"pid": 1}, tsu="default")
    events = store.events()
    assert [(e["kind"], e["tsu"], e["detail"]) for e in events] == [
        ("service.started", None, {"pid": 1}),
        ("service.stopped", "default", {"pid": 1}),
    ]


def test_unreachable_database_is_a_recording_error(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot open the records"):
        RecordStore(f"sqlite:///{tmp_path / 'missing-dir' / 'records.sqlite3'}")


def test_database_is_created_private_and_read_only_commands_never_create_one(tmp_path: Path) -> None:
    """The records hold requesters' addresses (0600); `tokens show` on a mistyped path must not make a new one."""
    path = tmp_path / "records.sqlite3"
    store = RecordStore(f"sqlite:///{path}")
    assert path.stat().st_mode & 0o777 == 0o600
    upgrade(f"sqlite:///{path}")
    asyncio.run(record_all(store, [record(1)]))
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(RecordingError, match="no records database"):
        RecordStore(f"sqlite:///{tmp_path / 'typo.sqlite3'}", create=False)
    assert not (tmp_path / "typo.sqlite3").exists()
    reader = RecordStore(f"sqlite:///{path}", create=False)
    assert reader.token_by_serial(1) == record(1)
    reader.close()


def test_a_held_write_lock_fails_requests_quickly_instead_of_freezing(store: RecordStore, tmp_path: Path) -> None:
    """Another process holding the write lock costs at most the short busy timeout, then systemFailure."""
    blocker = sqlite3.connect(tmp_path / "records.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        outcomes = asyncio.run(record_all(store, [record(20)]))
        assert time.monotonic() - start < 2
        assert isinstance(outcomes[0], RecordingError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert asyncio.run(record_all(store, [record(21)])) == [None]
