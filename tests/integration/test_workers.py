"""Several worker processes under load, and what the TSA answers when its records cannot be written.

SPEC TST-04 (unique serials across processes), STS-02 (always granted under load), OPS-09 and GUIDE habit 13
(no token leaves before its record is durable), STS-06 (a storage outage is systemFailure, never a token).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from asn1crypto import cms, core, tsp

if TYPE_CHECKING:
    from conftest import LiveTsa, TsaFactory

pytestmark = pytest.mark.integration

REQUESTS = 2000
THREADS = 8
SYSTEM_FAILURE = bytes.fromhex("03050600000040")
SHA256_NULL = bytes.fromhex("300d06096086480165030402010500")


class TimeStampResp(core.Sequence):
    """RFC 3161 §2.4.2 TimeStampResp (timeStampToken OPTIONAL, unlike asn1crypto's)."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def _int(value: int) -> bytes:
    content = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return bytes((0x02, len(content))) + content


def request_der(digest: bytes, nonce: int) -> bytes:
    """A DER TimeStampReq v1, SHA-256 with NULL parameters, nonce, certReq TRUE (short lengths only)."""
    imprint = b"\x30" + bytes((len(SHA256_NULL) + 34,)) + SHA256_NULL + b"\x04\x20" + digest
    body = b"\x02\x01\x01" + imprint + _int(nonce) + b"\x01\x01\xff"
    return b"\x30" + bytes((len(body),)) + body


def outcome(reply: bytes) -> tuple[int, tsp.TSTInfo | None, TimeStampResp]:
    resp = TimeStampResp.load(reply)
    status = resp["status"]["status"].native
    if status == "granted":
        info = resp["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed
        return 0, info, resp
    return 2 if status == "rejection" else -1, None, resp


def recorded_rows(tsa: LiveTsa) -> dict[int, tuple[bytes, bytes, str | None]]:
    """serial -> (imprint, token, nonce) straight from the SQLite records."""
    db = sqlite3.connect(f"file:{tsa.records_db}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT serial, imprint, token, nonce FROM tokens").fetchall()
    finally:
        db.close()
    return {int(serial, 16): (bytes(imprint), bytes(token), nonce) for serial, imprint, token, nonce in rows}


# === several processes, 2,000 requests ===


def hammer(targets: list[LiveTsa]) -> dict[int, tuple[bytes, int, bytes]]:
    """2,000 requests from 8 threads, spread over ``targets`` (processes serving one TSA), with a new connection
    every 25 requests so that every process takes connections; each reply must be a granted token with the
    request's own nonce and imprint and a serial never seen before. Returns serial -> (imprint, nonce, reply)."""

    def client(worker: int) -> list[tuple[bytes, int, bytes]]:
        results = []
        conn: http.client.HTTPConnection | None = None
        tsa = targets[0]
        for i in range(REQUESTS // THREADS):
            if i % 25 == 0:
                if conn is not None:
                    conn.close()
                tsa = targets[(worker + i // 25) % len(targets)]
                conn = tsa.connection()
            digest = os.urandom(32)
            nonce = (worker << 32) | i | (1 << 62)
            results.append((digest, nonce, tsa.timestamp(request_der(digest, nonce), conn=conn)))
        assert conn is not None
        conn.close()
        return results

    with ThreadPoolExecutor(THREADS) as pool:
        replies = [r for batch in pool.map(client, range(THREADS)) for r in batch]
    assert len(replies) == REQUESTS

    granted: dict[int, tuple[bytes, int, bytes]] = {}
    for digest, nonce, reply in replies:
        status, info, _ = outcome(reply)
        assert status == 0
        assert info is not None
        assert info["nonce"].native == nonce
        assert info["message_imprint"]["hashed_message"].native == digest
        serial = info["serial_number"].native
        assert serial not in granted, f"serial {serial:#x} issued twice"
        granted[serial] = (digest, nonce, reply)
    return granted


def assert_records_hold_exactly(tsa: LiveTsa, granted: dict[int, tuple[bytes, int, bytes]]) -> None:
    """OPS-09: the records hold every granted token (imprint, nonce, reply bytes) and nothing else."""
    rows = recorded_rows(tsa)
    assert rows.keys() == granted.keys()
    for serial, (digest, nonce, reply) in granted.items():
        assert rows[serial] == (digest, reply, str(nonce))


@pytest.fixture(scope="session")
def two_process_tsa(tsa_factory: TsaFactory) -> list[LiveTsa]:
    """Two `stampd serve` processes on one TSA directory: one configuration, one key, one records database."""
    first = tsa_factory("ec-p256", name="shared-1")
    return [first, tsa_factory("ec-p256", name="shared-2", share_dir_with=first)]


def test_two_processes_2000_requests_tst04(two_process_tsa: list[LiveTsa]) -> None:
    """TST-04, STS-02, OPS-09, REQ-08: two server processes sharing one records database take 2,000 requests from
    8 threads: all granted, no serial issued twice, and the records hold exactly the granted tokens, byte for byte
    (concurrent group commits from two processes lose nothing)."""
    granted = hammer(two_process_tsa)
    assert_records_hold_exactly(two_process_tsa[0], granted)


def test_two_workers_2000_requests_tst04(tsa_factory: TsaFactory) -> None:
    """TST-04, STS-02, OPS-09 with `stampd serve --workers 2`: 2,000 requests from 8 threads all granted, no
    duplicate serial, the records hold exactly the granted tokens, and both worker processes started."""
    tsa = tsa_factory("ec-p256", name="ec-p256-2-workers", workers=2)
    granted = hammer([tsa])
    assert_records_hold_exactly(tsa, granted)
    started = [kind for kind in _events(tsa) if kind == "service.started"]
    assert len(started) == 2, "both worker processes started and recorded it"


def _events(tsa: LiveTsa) -> list[str]:
    db = sqlite3.connect(f"file:{tsa.records_db}?mode=ro", uri=True)
    try:
        return [kind for (kind,) in db.execute("SELECT kind FROM events ORDER BY id")]
    finally:
        db.close()


# === records that cannot be written ===


REFUSE = "CREATE TRIGGER refuse_tokens BEFORE INSERT ON tokens BEGIN SELECT RAISE(ABORT, 'records refused'); END"


def _sql(tsa: LiveTsa, statement: str) -> None:
    db = sqlite3.connect(tsa.records_db, timeout=30)
    try:
        db.execute(statement)
        db.commit()
    finally:
        db.close()


@pytest.fixture(scope="session")
def refusing_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    return tsa_factory("ec-p256", name="records-refused")


def test_records_failure_is_system_failure_sts06(refusing_tsa: LiveTsa) -> None:
    """STS-06, STS-04, OPS-09, GUIDE habit 13: when the INSERT of the record fails mid-run (an SQLite trigger that
    RAISEs on every insert into tokens; chmod cannot stop a root-run server), each request, alone or in a
    concurrent batch, gets a DER rejection with exactly systemFailure (`03 05 06 00 00 00 40`) and no token; no
    row is half-written; once the records accept writes again, tokens are granted again without a restart."""
    tsa = refusing_tsa
    before_digest = os.urandom(32)
    status, info, _ = outcome(tsa.timestamp(request_der(before_digest, 1)))
    assert status == 0 and info is not None
    first_serial = info["serial_number"].native

    _sql(tsa, REFUSE)
    try:
        refused_digests = [os.urandom(32) for _ in range(24)]
        alone = tsa.timestamp(request_der(refused_digests[0], 2))
        with ThreadPoolExecutor(8) as pool:
            batch = list(pool.map(lambda d: tsa.timestamp(request_der(d, 3)), refused_digests[1:]))
        for reply in [alone, *batch]:
            status, info, resp = outcome(reply)
            assert status == 2 and info is None
            assert resp["status"]["fail_info"].dump() == SYSTEM_FAILURE
            assert isinstance(resp["time_stamp_token"], core.Void)
            assert b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02" not in reply  # no id-signedData anywhere
        rows = recorded_rows(tsa)
        assert set(rows) == {first_serial}, "nothing half-written"
        assert not any(imprint in refused_digests for imprint, _, _ in rows.values())
        for digest in refused_digests[:3]:
            assert tsa.stampd("tokens", "find", "--imprint", digest.hex(), check=False).returncode == 1
    finally:
        _sql(tsa, "DROP TRIGGER IF EXISTS refuse_tokens")

    after_digest = os.urandom(32)
    status, info, _ = outcome(tsa.timestamp(request_der(after_digest, 4)))
    assert status == 0 and info is not None
    assert recorded_rows(tsa)[info["serial_number"].native][0] == after_digest
    assert "records: " in tsa.log_text()  # the failure was logged for the operator


def _records_in_subdirectory(text: str) -> str:
    edited = re.sub(r'(?m)^url = "sqlite:///records.sqlite3"', 'url = "sqlite:///records/records.sqlite3"', text)
    assert edited != text
    return edited


def test_records_directory_removed_mid_run_gives_system_failure(tsa_factory: TsaFactory) -> None:
    """OPS-09, STS-06, GUIDE habit 13: after the records database's directory is removed mid-run, no token may be
    granted, since its record cannot be durable anywhere an auditor will find it."""

    def make_directory(tsa: LiveTsa) -> None:
        (tsa.dir / "records").mkdir()
        tsa.stampd("db", "upgrade")

    tsa = tsa_factory(
        "ec-p256", name="records-removed", config_edit=_records_in_subdirectory, before_start=make_directory
    )
    tsa.check_records = False  # its records are deleted on purpose
    try:
        status, info, _ = outcome(tsa.timestamp(request_der(os.urandom(32), 1)))
        assert status == 0 and info is not None
        shutil.rmtree(tsa.dir / "records")
        status, info, resp = outcome(tsa.timestamp(request_der(os.urandom(32), 2)))
    finally:
        tsa.stop(check=False)  # its shutdown cannot record service.stopped: the database is gone
    assert status == 2, "a token was granted although its record went into a deleted database"
    assert resp["status"]["fail_info"].dump() == SYSTEM_FAILURE
