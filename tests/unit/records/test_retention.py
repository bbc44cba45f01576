"""Retention (issue "Evidence that scales", item 4): a purge removes only a chain's old prefix, records itself with
the anchors that keep every chain verifiable, and the audit lets a chain start late only at such an anchor
(SPEC OPS-08, OPS-09)."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from stampd.config import _records, _Table
from stampd.errors import ConfigError, RecordingError
from stampd.model import TokenRecord
from stampd.records import retention
from stampd.records.audit import AuditReport, audit_records
from stampd.records.chain import GENESIS, event_entry_hash
from stampd.records.checkpoint import CheckpointSigner
from stampd.records.engine import BUSY_TIMEOUT_MS
from stampd.records.migrate import upgrade
from stampd.records.retention import (
    PURGED_EVENT,
    CheckpointKey,
    Piece,
    PurgeResult,
    cut_through,
    parse_anchors,
    plan_steps,
    purge_records,
)
from stampd.records.store import RecordStore

sys.path.insert(0, str(Path(__file__).parents[2]))

from recordstools import chained_tokens, insert_tokens

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CHECKPOINT = CheckpointKey(CheckpointSigner(KEY), KEY.public_key())
DAY_US = 86_400_000_000
NOW_US = 1_800_000_000_000_000


def record(serial: int, gen_time_us: int) -> TokenRecord:
    return TokenRecord(
        serial=serial,
        gen_time_ns=gen_time_us * 1000,
        gen_time="20270115080000Z",
        tsu="default",
        policy="2.25.7",
        hash_oid="2.16.840.1.101.3.4.2.1",
        imprint=serial.to_bytes(32, "big"),
        nonce=None,
        token=b"\x30\x03" + serial.to_bytes(8, "big"),
        requester=None,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "records.sqlite3"


@pytest.fixture
def url(path: Path) -> str:
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


def fill(url: str, ages_days: list[float], monkeypatch: pytest.MonkeyPatch, events_age_days: float = 30) -> str:
    """One store: a token per age (seq 1, 2, ... in that order), two events recorded ``events_age_days`` ago,
    and a checkpoint; returns the chain id."""
    store = RecordStore(url)

    async def record_all() -> None:
        for i, age in enumerate(ages_days, 1):
            await store.record(record(1000 + i, NOW_US - int(age * DAY_US)))

    asyncio.run(record_all())
    with monkeypatch.context() as m:
        m.setattr(time, "time_ns", lambda: (NOW_US - int(events_age_days * DAY_US)) * 1000)
        store.record_event("service.started", {"pid": 1})
        store.record_event("service.stopped", {"pid": 1})
    assert store.write_checkpoint(CHECKPOINT.signer) is not None
    store.close()
    return store.chain_id


def audit(url: str, with_key: bool = True) -> AuditReport:
    return audit_records(url, KEY.public_key() if with_key else None)


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def only_problem(report: AuditReport) -> str:
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_cut_through_keeps_a_chain_contiguous() -> None:
    assert cut_through(10, None, 0) == 10  # every entry old
    assert cut_through(10, 6, 0) == 5  # seq 6 is young: 7-10 are old but stay
    assert cut_through(10, 1, 0) is None  # the first entry is young: nothing goes
    assert cut_through(5, None, 5) is None  # already purged up to 5
    assert cut_through(8, None, 5) == 8


def test_parse_anchors_refuses_malformed_anchors() -> None:
    assert parse_anchors({"anchors": {"tokens": {"c": [3, "ab" * 32]}}}) == {"tokens": {"c": (3, bytes([0xAB]) * 32)}}
    for bad in (
        {},
        {"anchors": {"nope": {}}},
        {"anchors": {"tokens": {"c": [0, "ab" * 32]}}},
        {"anchors": {"tokens": {"c": [3, "ab"]}}},
        {"anchors": {"events": {"c": ["3", "ab" * 32]}}},
    ):
        with pytest.raises(ValueError):
            parse_anchors(bad)


def records_config(tmp_path: Path, retention: object) -> int:
    """records.retention as `load_config` reads the [records] table."""
    data = {} if retention is None else {"retention": retention}
    return _records(_Table(tmp_path / "stampd.toml", "records.", data)).retention_us


def test_retention_setting_has_units_a_default_and_a_floor(tmp_path: Path) -> None:
    assert records_config(tmp_path, None) == 5 * 366 * DAY_US  # never shorter than 5 calendar years
    assert records_config(tmp_path, "1826d") == 1826 * DAY_US
    assert records_config(tmp_path, "10y") == 3660 * DAY_US
    for bad, why in (("12h", "at least 1d"), ("5 years", "expected a duration"), (5, "expected str")):
        with pytest.raises(ConfigError, match=rf"stampd.toml: records\.retention: .*{why}"):
            records_config(tmp_path, bad)


def test_purge_removes_the_old_prefix_and_records_its_anchor_ops_09(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens aged 30, 20, 12, 3, 11, 1 days with 10 days' retention: seq 1-3 go; seq 5 (11 days) stays because the
    younger seq 4 precedes it; the events (30 days) go; the chain then starts at seq 4 after the anchor."""
    chain = fill(url, [30, 20, 12, 3, 11, 1], monkeypatch)
    with db(path) as conn:
        entry_3 = conn.execute("SELECT entry_hash FROM tokens WHERE seq = 3").fetchone()[0]
    dry = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT, dry_run=True)
    assert dry.counts() == {"tokens": 3, "events": 2}
    with db(path) as conn:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (6,)  # a dry run changes nothing
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone() == (1,)

    result = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)
    assert result.counts() == {"tokens": 3, "events": 2}
    assert result.kept == {"tokens": 1, "events": 0}
    assert result.anchors == {
        "tokens": {chain: (3, entry_3)},
        "events": {chain: (2, result.anchors["events"][chain][1])},
    }
    with db(path) as conn:
        assert [s for (s,) in conn.execute("SELECT seq FROM tokens ORDER BY seq")] == [4, 5, 6]
        (detail,) = conn.execute("SELECT detail FROM events WHERE kind = 'records.purged'").fetchone()
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone() == (2,)
    recorded = json.loads(detail)
    assert recorded["purged"] == {"tokens": 3, "events": 2}
    assert recorded["anchors"]["tokens"] == {chain: [3, entry_3.hex()]}
    assert recorded["cutoff_us"] == NOW_US - 10 * DAY_US

    report = audit(url)
    assert report.ok, report.problems
    tokens_chain = next(c for c in report.chains if c.table == "tokens")
    assert (tokens_chain.purged_through, tokens_chain.count, tokens_chain.head_seq) == (3, 3, 6)
    events_chain = next(c for c in report.chains if c.table == "events" and c.chain == chain)
    assert (events_chain.purged_through, events_chain.count) == (2, 0)  # purged to its end: only the anchor left


def test_a_second_purge_carries_the_anchors_forward_and_may_purge_the_first_purge_event(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = fill(url, [30, 20, 12, 3], monkeypatch)
    first = purge_records(url, retention_us=25 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)
    assert first.counts() == {"tokens": 1, "events": 2}
    later = NOW_US + 40 * DAY_US  # the first purge event is now older than the retention too
    second = purge_records(url, retention_us=25 * DAY_US, now_us=later, checkpoint=CHECKPOINT)
    assert second.counts() == {"tokens": 3, "events": 1}
    assert second.anchors["tokens"][chain][0] == 4
    assert second.anchors["events"][chain][0] == 2  # carried forward from the first purge
    assert first.event_chain in second.anchors["events"]
    with db(path) as conn:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
        assert conn.execute("SELECT chain FROM events").fetchall() == [(second.event_chain,)]
    report = audit(url)
    assert report.ok, report.problems


def test_tampering_after_a_purge_is_found(url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = fill(url, [30, 20, 12, 3, 2, 1], monkeypatch)
    purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)
    assert audit(url).ok
    with db(path) as conn:
        conn.execute("DELETE FROM tokens WHERE seq = 4")  # the new first entry
    assert f"tokens chain {chain} seq 5 (serial 0x3ed): missing entry before it (seq 4 deleted)" in only_problem(
        audit(url)
    )


def test_an_edited_anchor_is_found(url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(url, [30, 20, 12, 3], monkeypatch)
    purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)
    with db(path) as conn:
        (detail,) = conn.execute("SELECT detail FROM events WHERE kind = 'records.purged'").fetchone()
        edited = json.loads(detail)
        (anchor_chain,) = edited["anchors"]["tokens"]
        edited["anchors"]["tokens"][anchor_chain][1] = "00" * 32
        conn.execute("UPDATE events SET detail = ? WHERE kind = 'records.purged'", (json.dumps(edited),))
    problems = audit(url).problems
    assert any("records.purged" in p and "edited" in p for p in problems), problems
    assert any("does not follow the purge anchor" in p for p in problems), problems
    with pytest.raises(RecordingError, match="is not intact"):  # nor is a tampered anchor carried forward
        purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US + DAY_US, checkpoint=CHECKPOINT)


def test_a_forged_purge_event_does_not_excuse_a_deletion(url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone with write access can add an intact chain of their own: without a checkpoint it proves nothing."""
    chain = fill(url, [30, 20, 12, 3], monkeypatch)
    with db(path) as conn:
        entry_2 = conn.execute("SELECT entry_hash FROM tokens WHERE seq = 2").fetchone()[0]
        conn.execute("DELETE FROM tokens WHERE seq <= 2")
        row = {
            "at_us": NOW_US,
            "kind": "records.purged",
            "tsu": None,
            "detail": json.dumps({"anchors": {"tokens": {chain: [2, entry_2.hex()]}}}),
        }
        forged = event_entry_hash(GENESIS, "forger", 1, row)
        conn.execute(
            "INSERT INTO events (at_us, kind, tsu, detail, chain, seq, prev_hash, entry_hash) "
            "VALUES (?, ?, ?, ?, 'forger', 1, ?, ?)",
            (row["at_us"], row["kind"], row["tsu"], row["detail"], GENESIS, forged),
        )
    problem = only_problem(audit(url))
    assert f"tokens chain {chain}: starts after seq 2" in problem
    assert "events chain forger seq 1, which is covered by no verified checkpoint" in problem
    with pytest.raises(RecordingError, match="covered by no checkpoint"):
        purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)


def test_without_a_checkpoint_key_a_purge_is_accepted_from_its_intact_event(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RecordStore(url)

    async def record_all() -> None:
        for i, age in enumerate([30, 20, 3], 1):
            await store.record(record(i, NOW_US - age * DAY_US))

    asyncio.run(record_all())
    store.close()
    result = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=None)
    assert result.checkpoint_ids == [] and result.counts()["tokens"] == 2
    report = audit(url, with_key=False)
    assert report.ok, report.problems
    with db(path) as conn:
        conn.execute("UPDATE tokens SET seq = 2 WHERE seq = 3")  # pretend less was purged
    assert "present, but seq 1-2 were purged" in only_problem(audit(url, with_key=False))


@pytest.fixture
def two_stores(url: str) -> Iterator[tuple[RecordStore, RecordStore]]:
    a, b = RecordStore(url), RecordStore(url)
    yield a, b
    a.close()
    b.close()


def test_each_chain_is_cut_on_its_own(two_stores: tuple[RecordStore, RecordStore], url: str) -> None:
    a, b = two_stores

    async def record_all() -> None:
        await a.record(record(1, NOW_US - 30 * DAY_US))
        await b.record(record(2, NOW_US - 2 * DAY_US))
        await a.record(record(3, NOW_US - 20 * DAY_US))
        await b.record(record(4, NOW_US - 40 * DAY_US))  # old, but after a young entry of its chain

    asyncio.run(record_all())
    result = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT)
    assert [(c.chain, c.from_seq, c.through_seq) for c in result.cuts] == [(a.chain_id, 1, 2)]
    assert result.kept["tokens"] == 1
    report = audit(url)
    assert report.ok, report.problems


def test_plan_steps_bounds_every_step() -> None:
    pieces = [Piece("tokens", "a", 1, 7), Piece("events", "b", 4, 2), Piece("tokens", None, 0, 4)]
    assert plan_steps(pieces, 5) == [
        [Piece("tokens", "a", 1, 5)],
        [Piece("tokens", "a", 6, 2), Piece("events", "b", 4, 2), Piece("tokens", None, 0, 1)],
        [Piece("tokens", None, 0, 3)],
    ]
    assert plan_steps([], 5) == [[]]  # a purge that removes nothing is still recorded
    with pytest.raises(ValueError):
        plan_steps(pieces, 0)


def purge_events(path: Path) -> list[tuple[str, int, dict[str, object]]]:
    with db(path) as conn:
        query = "SELECT chain, seq, detail FROM events WHERE kind = ? ORDER BY id"
        rows = conn.execute(query, (PURGED_EVENT,)).fetchall()
    return [(chain, seq, json.loads(detail)) for chain, seq, detail in rows]


def test_a_purge_runs_in_bounded_steps_each_recorded_and_signed_ops_09(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """25 old tokens and 2 old events, 10 rows a step: 3 transactions, each a records.purged event (seq 1-3 of one
    events chain) carrying every anchor so far and signed by its own checkpoint; the audit passes."""
    monkeypatch.setattr(retention, "STEP_PAUSE_S", 0.0)
    chain = fill(url, [30 - i * 0.5 for i in range(25)] + [1], monkeypatch)
    result = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT, batch_rows=10)
    assert result.counts() == {"tokens": 25, "events": 2}
    assert result.steps == 3 and len(result.checkpoint_ids) == 3
    recorded = purge_events(path)
    assert [(c, s) for c, s, _ in recorded] == [(result.event_chain, seq) for seq in (1, 2, 3)]
    assert [d["purged"] for _, _, d in recorded] == [
        {"tokens": 10, "events": 0},
        {"tokens": 10, "events": 0},
        {"tokens": 5, "events": 2},
    ]
    assert [d["anchors"]["tokens"][chain][0] for _, _, d in recorded] == [10, 20, 25]  # type: ignore[index]
    assert "events" not in recorded[1][2]["anchors"]  # not cut yet
    assert [d["step"] for _, _, d in recorded] == [1, 2, 3] and recorded[0][2]["steps"] == 3
    with db(path) as conn:
        assert [s for (s,) in conn.execute("SELECT seq FROM tokens ORDER BY seq")] == [26]
    report = audit(url)
    assert report.ok, report.problems
    purge_chain = next(c for c in report.chains if c.chain == result.event_chain)
    assert (purge_chain.head_seq, purge_chain.checkpointed_seq) == (3, 3)


class FailingSigner(CheckpointSigner):
    """Signs ``good`` checkpoints, then fails: a purge that stops between two steps."""

    def __init__(self, good: int) -> None:
        super().__init__(KEY)
        self.good = good

    def sign(self, data: bytes) -> bytes:
        if self.good == 0:
            raise OSError("the disk went away")
        self.good -= 1
        return super().sign(data)


def test_a_purge_stopped_between_steps_leaves_verifiable_records_and_the_next_finishes(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "STEP_PAUSE_S", 0.0)
    chain = fill(url, [30 - i * 0.5 for i in range(25)] + [1], monkeypatch)
    with pytest.raises(OSError, match="disk went away"):
        purge_records(
            url,
            retention_us=10 * DAY_US,
            now_us=NOW_US,
            checkpoint=CheckpointKey(FailingSigner(good=2), KEY.public_key()),
            batch_rows=10,
        )
    with db(path) as conn:  # steps 1 and 2 committed whole; step 3 not at all
        assert conn.execute("SELECT min(seq), count(*) FROM tokens").fetchone() == (21, 6)
        assert conn.execute("SELECT count(*) FROM events WHERE chain = ?", (chain,)).fetchone() == (2,)
    assert [d["step"] for _, _, d in purge_events(path)] == [1, 2]
    report = audit(url)
    assert report.ok, report.problems

    finished = purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT, batch_rows=10)
    assert finished.counts() == {"tokens": 5, "events": 2} and finished.steps == 1
    assert finished.anchors["tokens"][chain][0] == 25
    report = audit(url)
    assert report.ok, report.problems


def test_a_purge_never_deletes_a_younger_row_nor_leaves_a_chain_broken(
    url: str, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three chains of tokens with ages in random order, purged in small steps: every row removed was older than
    the cut-off, every chain keeps a contiguous suffix that still starts at its anchor."""
    monkeypatch.setattr(retention, "STEP_PAUSE_S", 0.0)
    rng = random.Random(7)
    ages: dict[str, list[float]] = {c: [rng.uniform(0, 40) for _ in range(40)] for c in ("x", "y", "z")}
    ages["x"].sort(reverse=True)  # oldest first, as a chain usually is
    for i, (chain, chain_ages) in enumerate(ages.items()):
        gen_times = [NOW_US - int(a * DAY_US) for a in chain_ages]
        insert_tokens(path, chained_tokens(chain, gen_times, first_serial=1000 * (i + 1)))
    cutoff = NOW_US - 20 * DAY_US
    result = purge_records(url, retention_us=20 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT, batch_rows=7)
    with db(path) as conn:
        query = "SELECT seq FROM tokens WHERE chain = ? ORDER BY seq"
        left = {c: [s for (s,) in conn.execute(query, (c,))] for c in ages}
    for chain, chain_ages in ages.items():
        first_young = next((i for i, a in enumerate(chain_ages) if NOW_US - int(a * DAY_US) >= cutoff), None)
        purged = len(chain_ages) if first_young is None else first_young
        assert left[chain] == list(range(purged + 1, len(chain_ages) + 1)), chain
        assert all(NOW_US - int(a * DAY_US) < cutoff for a in chain_ages[:purged])
    assert result.counts()["tokens"] == sum(len(a) for a in ages.values()) - sum(len(v) for v in left.values())
    report = audit(url)
    assert report.ok, report.problems


def test_a_purge_never_holds_a_serving_process_back_ops_09(url: str, path: Path) -> None:
    """A serving process waits BUSY_TIMEOUT_MS (200 ms) for the write lock before it refuses the token: a purge of
    120,000 rows on SQLite (one transaction held the lock for about 0.4 s) must let every commit through quickly."""
    insert_tokens(path, chained_tokens("bulk", [NOW_US - 30 * DAY_US + i for i in range(120_000)], 10**9))
    store = RecordStore(url)
    outcome: list[PurgeResult | BaseException] = []

    def purge() -> None:
        try:
            outcome.append(purge_records(url, retention_us=10 * DAY_US, now_us=NOW_US, checkpoint=CHECKPOINT))
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)

    async def serve(purging: threading.Thread) -> tuple[int, list[str], float]:
        issued, failures, longest = 0, [], 0.0
        purging.start()
        while purging.is_alive():
            started = time.monotonic()
            try:
                await store.record(record(issued + 1, NOW_US + issued))
            except RecordingError as e:
                failures.append(str(e))
            longest = max(longest, time.monotonic() - started)
            issued += 1
            await asyncio.sleep(0.002)
        return issued, failures, longest

    issued, failures, longest = asyncio.run(serve(threading.Thread(target=purge)))
    store.close()
    (result,) = outcome
    assert isinstance(result, PurgeResult), result
    assert failures == [], failures[:3]
    assert issued > 20 and longest < BUSY_TIMEOUT_MS / 1000
    assert result.counts()["tokens"] == 120_000 and result.steps == 24  # of 5,000 rows each
    assert result.longest_step_s < BUSY_TIMEOUT_MS / 1000
    report = audit(url)
    assert report.ok, report.problems
