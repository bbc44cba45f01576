"""PostgreSQL records (psycopg 3) against a real server: group commit, one bad row failing alone, the stopped-TSU
trigger, events, and a whole TSA serving on PostgreSQL (SPEC OPS-09, OPS-10, TST-04, STS-06).

Each test gets a database of its own (CREATE DATABASE stampd_test_<random>), dropped at teardown. The server is
$STAMPD_TEST_POSTGRES (a libpq URL of a database to connect to for CREATE DATABASE), by default the local
server with trust authentication; it must be reachable: these tests fail rather than skip without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from conftest import LiveTsa, free_loopback_port, run_stampd
from psycopg import sql

from stampd.der.request import encode_request
from stampd.errors import RecordingError
from stampd.model import MessageImprint, TimeStampRequest, TokenRecord
from stampd.oids import SHA256
from stampd.records.migrate import current_revision, head_revision, upgrade
from stampd.records.store import RecordStore

pytestmark = pytest.mark.integration

ADMIN_URL = os.environ.get("STAMPD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"no PostgreSQL at {ADMIN_URL} (set STAMPD_TEST_POSTGRES): {e}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database, dropped (with any connection left to it) after the test."""
    name = f"stampd_test_{secrets.token_hex(6)}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    user = base.get("user", "postgres")
    host = base.get("host", "127.0.0.1")
    port = base.get("port", 5432)
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def store(pg_url: str) -> Iterator[RecordStore]:
    assert upgrade(pg_url) == head_revision()
    s = RecordStore(pg_url)
    s.check_schema()
    yield s
    s.close()


def token_record(
    serial: int, *, tsu: str = "default", imprint: bytes = b"\x01" * 32, nonce: int | None = 7
) -> TokenRecord:
    return TokenRecord(
        serial=serial,
        gen_time_ns=1772366400_123_000_000,
        gen_time="20260301120000.123Z",
        tsu=tsu,
        policy="2.25.7",
        hash_oid="2.16.840.1.101.3.4.2.1",
        imprint=imprint,
        nonce=nonce,
        token=b"\x30\x03" + serial.to_bytes(20, "big"),
        requester="::1",
    )


async def record_all(store: RecordStore, records: list[TokenRecord]) -> list[BaseException | None]:
    return await asyncio.gather(*(store.record(r) for r in records), return_exceptions=True)


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    """Read the database directly, as an auditor would."""
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_upgrade_is_idempotent_and_the_server_check_passes(pg_url: str) -> None:
    assert current_revision(pg_url) is None
    empty = RecordStore(pg_url)
    with pytest.raises(RecordingError, match=r"the records schema is at empty .*, this stampd needs 0003"):
        empty.check_schema()
    empty.close()
    assert upgrade(pg_url) == upgrade(pg_url) == head_revision()
    assert current_revision(pg_url) == head_revision()
    triggers = _rows(pg_url, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'tokens'::regclass AND NOT tgisinternal")
    assert triggers == [("tokens_refused_for_stopped_tsu",)]


def test_concurrent_records_are_committed_and_read_back(store: RecordStore, pg_url: str) -> None:
    records = [token_record(2**159 + i, imprint=bytes([i % 7]) * 32, nonce=None if i % 2 else -i) for i in range(1000)]
    assert asyncio.run(record_all(store, records)) == [None] * 1000
    assert _rows(pg_url, "SELECT count(*) FROM tokens") == [(1000,)]
    for i in (0, 5, 999):
        assert store.token_by_serial(2**159 + i) == records[i]
    assert store.token_by_serial(12345) is None
    found = store.tokens_by_imprint(bytes([3]) * 32)
    assert {r.serial for r in found} == {2**159 + i for i in range(1000) if i % 7 == 3}
    assert all(r == records[r.serial - 2**159] for r in found)
    assert store.last_gen_time_ns() == 1772366400_123_000_000


def test_duplicate_serial_fails_only_that_token_tst_04(store: RecordStore) -> None:
    assert asyncio.run(record_all(store, [token_record(1)])) == [None]
    outcomes = asyncio.run(record_all(store, [token_record(2), token_record(1), token_record(3)]))
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RecordingError)
    assert store.token_by_serial(1) == token_record(1)
    assert store.token_by_serial(2) == token_record(2) and store.token_by_serial(3) == token_record(3)
    assert asyncio.run(record_all(store, [token_record(4)])) == [None]  # the connection is usable afterwards


def test_the_database_refuses_records_of_a_compromised_tsu_ops_10(store: RecordStore, pg_url: str) -> None:
    assert asyncio.run(record_all(store, [token_record(1, tsu="a"), token_record(2, tsu="b")])) == [None, None]
    stopped = store.stop_tsu("a", "compromised", since_us=5, reason="key leaked", detail={"since": "then"})
    assert (stopped.tsu, stopped.state, stopped.since_us, stopped.reason) == ("a", "compromised", 5, "key leaked")
    outcomes = asyncio.run(record_all(store, [token_record(3, tsu="a"), token_record(4, tsu="b")]))
    assert isinstance(outcomes[0], RecordingError) and outcomes[1] is None
    assert store.token_by_serial(3) is None
    assert store.tsu_states()["a"].state == "compromised"
    assert [r.serial for r in store.tokens_between("a", 0)] == [1]
    # any other writer is refused too: the trigger, not the store, holds the line
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.CheckViolation, match="compromised"):
        conn.execute(
            "INSERT INTO tokens (serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, token)"
            " VALUES ('ff', 'x', 0, 'a', 'p', 'h', '\\x00', '\\x00')"
        )


def test_events_are_recorded_in_order(store: RecordStore) -> None:
    store.record_event("service.started", {"pid": 1})
    store.record_event("service.stopped", {"pid": 1}, tsu="default")
    assert [(e["kind"], e["tsu"], e["detail"]) for e in store.events()] == [
        ("service.started", None, {"pid": 1}),
        ("service.stopped", "default", {"pid": 1}),
    ]
    assert store.has_event("service.stopped", "default", pid=1)
    assert not store.has_event("service.stopped", None, pid=1)


def test_a_lost_connection_fails_requests_then_recovers(store: RecordStore, pg_url: str) -> None:
    """STS-06: a dropped server connection never gives a token without its record, never hangs, and is replaced
    by a new connection (a database restart or failover needs no restart of stampd)."""
    assert asyncio.run(record_all(store, [token_record(1)])) == [None]
    name = pg_url.rsplit("/", 1)[1]
    with _admin() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    outcomes = asyncio.run(record_all(store, [token_record(2)]))
    # The batch fails on the dead connection and is retried once on a new one: either way, a request is told
    # success exactly when its record is there.
    assert (outcomes[0] is None) == (store.token_by_serial(2) is not None)
    assert outcomes[0] is None or isinstance(outcomes[0], RecordingError)
    assert asyncio.run(record_all(store, [token_record(3)])) == [None]
    assert store.token_by_serial(3) == token_record(3)


# --- a whole TSA on PostgreSQL ---


def _query(digest: bytes) -> bytes:
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, secrets.randbits(63), True, ())
    return encode_request(request)


def test_a_tsa_serving_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """`stampd init`, records.url pointed at PostgreSQL, `stampd serve` refuses the empty database, `stampd db
    upgrade`, then 200 tokens granted from 8 threads: every one in PostgreSQL byte for byte, `stampd tokens show`
    and `find` read them back, and the service events are there."""
    tsa = LiveTsa(
        name="postgres", key_type="ec-p256", rsa_pss=False, dir=tmp_path / "tsa", host="127.0.0.1",
        port=free_loopback_port(),
    )  # fmt: skip
    run_stampd("init", tsa.dir, "--key-type", "ec-p256", "--listen", f"{tsa.host}:{tsa.port}")
    text = tsa.config.read_text()
    edited = re.sub(r'(?m)^url = "sqlite:///records.sqlite3"', f'url = "{pg_url}"', text)
    assert edited != text
    tsa.config.write_text(edited)

    refused = tsa.stampd("serve", check=False)
    assert refused.returncode != 0
    assert f"this stampd needs 0003: run `stampd db upgrade -c {tsa.config}`" in refused.stderr + refused.stdout
    assert tsa.stampd("db", "current", check=False).returncode == 1
    assert tsa.stampd("db", "upgrade").stdout == "the records schema is now at 0003 (was empty)\n"
    assert tsa.stampd("db", "current").stdout == "0003 (head)\n"

    tsa.start()
    try:
        digests = [hashlib.sha256(str(i).encode()).digest() for i in range(200)]

        def stamp(chunk: list[bytes]) -> None:
            conn = tsa.connection()
            try:
                for digest in chunk:
                    tsa.timestamp(_query(digest), conn=conn)
            finally:
                conn.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(stamp, [digests[i::8] for i in range(8)]))
    finally:
        tsa.stop(check=False)
    log = tsa.log_text()
    assert "Application shutdown complete" in log and "Traceback" not in log, log
    assert len(tsa.granted) == 200

    recorded = {int(str(s), 16): bytes(t) for s, t in _rows(pg_url, "SELECT serial, token FROM tokens")}
    assert recorded == tsa.granted
    kinds = [k for (k,) in _rows(pg_url, "SELECT kind FROM events ORDER BY id")]
    assert kinds[0] == "service.started" and kinds[-1] == "service.stopped"
    with sqlite3.connect(f"file:{tsa.records_db}?mode=ro", uri=True) as demo:  # made by `stampd init`, unused
        assert demo.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
    demo.close()

    serial = next(iter(tsa.granted))
    shown = json.loads(tsa.stampd("tokens", "show", hex(serial), "--json").stdout)
    assert int(shown["serial"]) == serial
    found = json.loads(tsa.stampd("tokens", "find", "--imprint", digests[0].hex(), "--json").stdout)
    assert len(found) == 1
    assert tsa.stampd("tokens", "show", "0x1", check=False).returncode == 1
