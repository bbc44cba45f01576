"""The records' evidence end to end (issue "Evidence that scales", item 3): a real `stampd serve` killed with
SIGKILL under load and restarted leaves two intact chains (one per process run) that `stampd audit verify`
accepts, with every token a client received in the records; a deleted, reordered or edited entry that the
command line names, with exit status 1; and the same audit on PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import LiveTsa, TsaFactory, run_stampd
from cryptography.hazmat.primitives.asymmetric import ed25519

from stampd.der.request import encode_request
from stampd.model import MessageImprint, TimeStampRequest, TokenRecord
from stampd.oids import SHA256
from stampd.records.audit import audit_records
from stampd.records.checkpoint import CheckpointSigner
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore

sys.path.insert(0, str(Path(__file__).parents[1]))

from recordstools import postgres_database

pytestmark = pytest.mark.integration


def _query(digest: bytes) -> bytes:
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, secrets.randbits(63), True, ())
    return encode_request(request)


def _load(tsa: LiveTsa, stop: threading.Event, threads: int = 6) -> list[threading.Thread]:
    """Clients stamping until ``stop`` or until the server goes away."""

    def client(index: int) -> None:
        conn = tsa.connection(timeout=5)
        i = 0
        try:
            while not stop.is_set():
                tsa.timestamp(_query(hashlib.sha256(f"{index}-{i}".encode()).digest()), conn=conn)
                i += 1
        except (OSError, AssertionError):  # the server was killed mid-request: that reply never arrived
            pass
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    return workers


def test_kill_9_under_load_then_restart_leaves_intact_chains(tsa_factory: TsaFactory) -> None:
    tsa = tsa_factory(
        "ec-p256",
        name="audit-kill9",
        config_edit=lambda text: text.replace('checkpoint_interval = "5m"', 'checkpoint_interval = "200ms"'),
    )
    stop = threading.Event()
    clients = _load(tsa, stop)
    time.sleep(1.0)
    assert tsa.process is not None
    tsa.process.kill()  # SIGKILL: no service.stopped event, no final checkpoint
    tsa.process.wait()
    tsa.process = None
    stop.set()
    for c in clients:
        c.join(10)
    first_run = len(tsa.granted)
    assert first_run > 50

    tsa.start()
    stop.clear()
    clients = _load(tsa, stop, threads=2)
    time.sleep(0.5)
    stop.set()
    for c in clients:
        c.join(10)
    tsa.stop()  # SIGTERM: a clean stop ends with a checkpoint
    assert len(tsa.granted) > first_run
    tsa.check_granted_are_recorded()

    result = tsa.stampd("audit", "verify", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    token_chains = [c for c in report["chains"] if c["table"] == "tokens"]
    assert len(token_chains) == 2  # one per process run
    assert sum(c["count"] for c in token_chains) == len(tsa.records())
    assert report["checkpoints"] >= 2
    # The clean run's chains are checkpointed to their heads; the killed run's up to some checkpoint before.
    assert sum(c["checkpointed_seq"] == c["head"][0] for c in report["chains"]) >= 2
    assert all(0 < c["checkpointed_seq"] <= c["head"][0] for c in token_chains)

    # Any edit is now found by the command line, named, with exit status 1.
    with sqlite3.connect(tsa.records_db) as conn:
        conn.execute(
            "UPDATE tokens SET requester = '192.0.2.1' WHERE seq = 3 AND chain = ?", (token_chains[0]["chain"],)
        )
    conn.close()
    tampered = tsa.stampd("audit", "verify", check=False)
    assert tampered.returncode == 1
    assert f"tokens chain {token_chains[0]['chain']} seq 3 (serial 0x" in tampered.stdout
    assert "edited" in tampered.stdout
    tsa.check_records = False  # its records were edited on purpose


@pytest.fixture(scope="module")
def audited_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """A TSA that granted 10 tokens and stopped cleanly: one chain of tokens, one of events, a final checkpoint.
    Its own records are never edited; each tampering case works on a copy of its directory."""
    tsa = tsa_factory("ec-p256", name="audit-tamper")
    for i in range(10):
        tsa.timestamp(_query(hashlib.sha256(f"tamper-{i}".encode()).digest()))
    tsa.stop()
    return tsa


def _one(conn: sqlite3.Connection, sql: str, *args: object) -> str:
    (value,) = conn.execute(sql, args).fetchone()
    return str(value)


def _delete_token(conn: sqlite3.Connection, chain: str) -> str:
    following = _one(conn, "SELECT serial FROM tokens WHERE chain = ? AND seq = 6", chain)
    conn.execute("DELETE FROM tokens WHERE chain = ? AND seq = 5", (chain,))
    return f"tokens chain {chain} seq 6 (serial 0x{following}): missing entry before it (seq 5 deleted)"


def _delete_last_token(conn: sqlite3.Connection, chain: str) -> str:
    conn.execute("DELETE FROM tokens WHERE chain = ? AND seq = 10", (chain,))
    return f"tokens chain {chain} seq 10: missing: checkpoint "  # the final checkpoint signed seq 10


def _swap_tokens(first: int, second: int, reason: str = "") -> Callable[[sqlite3.Connection, str], str]:
    """Exchange the places of two token rows (through seq -1: (chain, seq) is unique at every step); the problem
    names the entry now at ``first``, with ``reason`` if given."""

    def swap(conn: sqlite3.Connection, chain: str) -> str:
        moved = _one(conn, "SELECT serial FROM tokens WHERE chain = ? AND seq = ?", chain, second)
        for old, new in ((first, -1), (second, first), (-1, second)):
            conn.execute("UPDATE tokens SET seq = ? WHERE chain = ? AND seq = ?", (new, chain, old))
        return f"tokens chain {chain} seq {first} (serial 0x{moved}): {reason}"

    return swap


def _edit_event(conn: sqlite3.Connection, chain: str) -> str:
    kind = _one(conn, "SELECT kind FROM events WHERE chain = ? AND seq = 1", chain)
    conn.execute("UPDATE events SET detail = '{\"pid\": 1}' WHERE chain = ? AND seq = 1", (chain,))
    return f"events chain {chain} seq 1 (event {kind}): edited (its fields no longer hash to its entry hash)"


@pytest.mark.parametrize(
    ("tamper", "table"),
    [
        pytest.param(_delete_token, "tokens", id="token-deleted"),
        pytest.param(_delete_last_token, "tokens", id="last-token-deleted"),
        pytest.param(_swap_tokens(3, 6, "out of order (this entry was recorded at seq 6)"), "tokens", id="swapped"),
        pytest.param(
            _swap_tokens(3, 4, "out of order (this entry was recorded at seq 4)"), "tokens", id="adjacent-swapped"
        ),
        pytest.param(_edit_event, "events", id="event-edited"),
    ],
)
def test_audit_verify_names_a_deleted_reordered_or_edited_entry(
    audited_tsa: LiveTsa, tmp_path: Path, tamper: Callable[[sqlite3.Connection, str], str], table: str
) -> None:
    """`stampd audit verify` on a copy of intact records: OK; then after one deletion, reordering or edit: exit
    status 1, the chain marked FAILED and the bad entry named by table, chain and seq."""
    copy = tmp_path / "tsa"
    shutil.copytree(audited_tsa.dir, copy)
    config = copy / "stampd.toml"
    intact = run_stampd("audit", "verify", "-c", config, check=False)
    assert intact.returncode == 0 and "Audit: OK" in intact.stdout, intact.stdout + intact.stderr
    assert "checkpoints verified: " in intact.stdout and "checkpoints verified: 0" not in intact.stdout

    with sqlite3.connect(copy / "records.sqlite3") as conn:
        (chain,) = {str(c) for (c,) in conn.execute(f"SELECT chain FROM {table}")}  # one process run, one chain
        problem = tamper(conn, chain)
    conn.close()
    result = run_stampd("audit", "verify", "-c", config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"problem: {problem}" in result.stdout, result.stdout
    assert f"[FAILED] {table} chain {chain}: " in result.stdout
    assert result.stdout.count("problem: ") == 1, result.stdout  # the other chain is intact
    assert result.stdout.rstrip().endswith("Audit: FAILED")


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_audit_on_postgresql(pg_url: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    upgrade(pg_url)
    records = [
        TokenRecord(
            serial=2**120 + i,
            gen_time_ns=1772366400_123_000_000,
            gen_time="20260301120000.123Z",
            tsu="default",
            policy="2.25.7",
            hash_oid="2.16.840.1.101.3.4.2.1",
            imprint=bytes([i % 251]) * 32,
            nonce=None if i % 2 else i,
            token=b"\x30\x03" + i.to_bytes(20, "big"),
            requester="::1",
        )
        for i in range(300)
    ]

    async def record_all(store: RecordStore) -> list[BaseException | None]:
        return await asyncio.gather(*(store.record(r) for r in records), return_exceptions=True)

    store = RecordStore(pg_url)
    assert asyncio.run(record_all(store)) == [None] * 300
    store.record_event("service.started", {"pid": 1})
    outcomes = asyncio.run(record_all(store))  # every serial again: each fails alone, the chain has no gap
    assert all(o is not None for o in outcomes)
    store.record_event("service.stopped", {"pid": 1})
    assert store.write_checkpoint(CheckpointSigner(key)) is not None
    store.close()

    report = audit_records(pg_url, key.public_key())
    assert report.ok, report.problems
    assert sorted((c.table, c.count, c.checkpointed_seq) for c in report.chains) == [
        ("events", 2, 2),
        ("tokens", 300, 300),
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM tokens WHERE seq >= 299")
    problems = audit_records(pg_url, key.public_key()).problems
    assert len(problems) == 1 and "seq 299: missing: checkpoint 1" in problems[0], problems
