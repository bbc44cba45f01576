"""The records' evidence end to end (issue "Evidence that scales", item 3): a real `stampd serve` killed with
SIGKILL under load and restarted leaves two intact chains (one per process run) that `stampd audit verify`
accepts, with every token a client received in the records; and the same audit on PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import LiveTsa, TsaFactory
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
