"""Several worker processes under load, and what the TSA answers when its records cannot be written.

SPEC TST-04 (unique serials across processes), STS-02 (always granted under load), OPS-09 and GUIDE habit 13
(no token leaves before its record is durable), STS-06 (a storage outage is systemFailure, never a token).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from asn1crypto import cms, core, tsp
from conftest import run_stampd
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

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


# === several workers: reload in place, metrics of every worker, clean stop ===


LOAD_THREADS = 6
IDLE_CONNECTIONS = 4
RECONNECT_EVERY = 20


def _only_tsus(text: str, names: set[str]) -> str:
    """The configuration with only the [tsu.NAME] tables (and their sub-tables) of ``names``."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            table = line.strip().strip("[]")
            skipping = table.startswith("tsu.") and table.split(".")[1] not in names
        if not skipping:
            kept.append(line)
    return "".join(kept)


def _tsus_a_b_c(tsa: LiveTsa) -> None:
    """`stampd init --tsu a --tsu b --tsu c`, kept aside as full.toml; the server starts with TSU a only."""
    listen = f"{tsa.host}:{tsa.port}"
    tsus = ("--tsu", "a", "--tsu", "b", "--tsu", "c")
    run_stampd("init", tsa.dir, "--key-type", tsa.key_type, "--listen", listen, "--force", *tsus)
    full = tsa.config.read_text()
    (tsa.dir / "full.toml").write_text(full)
    tsa.config.write_text(_only_tsus(full, {"a"}))


class KeepAliveLoad:
    """Client threads sending requests without pause over keep-alive connections (a new one every
    ``RECONNECT_EVERY`` requests, so that every worker takes some), to the TSU paths in ``paths`` (which the test
    extends as TSUs are added). Every request is counted; any that is not a granted token is kept as a failure."""

    def __init__(self, tsa: LiveTsa, paths: list[str]) -> None:
        self.tsa = tsa
        self.paths = paths
        self.sent = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(LOAD_THREADS)
        self._futures: list[Future[None]] = []

    def __enter__(self) -> KeepAliveLoad:
        self._futures = [self._pool.submit(self._client, i) for i in range(LOAD_THREADS)]
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()

    def _client(self, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self._stop.is_set():
            if i % RECONNECT_EVERY == 0:
                if conn is not None:
                    conn.close()
                conn = self.tsa.connection()
            assert conn is not None
            path = self.paths[(index + i) % len(self.paths)]
            i += 1
            self.record(_granted_or_why(self.tsa, path, conn))
        if conn is not None:
            conn.close()

    def record(self, failure: str | None) -> None:
        with self._lock:
            self.sent += 1
            if failure is not None:
                self.failures.append(failure)

    def count(self) -> int:
        with self._lock:
            return self.sent


def _granted_or_why(tsa: LiveTsa, path: str, conn: http.client.HTTPConnection) -> str | None:
    """POST one request on ``conn``: None when a granted token for it came back, else what went wrong."""
    digest, nonce = os.urandom(32), int.from_bytes(os.urandom(7), "big")
    try:
        status, _, body = tsa.post(request_der(digest, nonce), path=path, conn=conn)
    except (OSError, http.client.HTTPException) as e:
        return f"{path}: {type(e).__name__}: {e}"
    if status != 200:
        return f"{path}: HTTP {status}: {body[:80]!r}"
    code, info, _ = outcome(body)
    if code != 0 or info is None or info["nonce"].native != nonce:
        return f"{path}: not a granted token for this request"
    return None


def _event_chains(tsa: LiveTsa, kind: str) -> list[str]:
    """The chain (one per process that opened the records) of each event of ``kind``, in order."""
    db = sqlite3.connect(f"file:{tsa.records_db}?mode=ro", uri=True)
    try:
        return [chain for (chain,) in db.execute("SELECT chain FROM events WHERE kind = ? ORDER BY id", (kind,))]
    finally:
        db.close()


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _scrape(tsa: LiveTsa) -> dict[str, list[Sample]]:
    """GET /metrics on a new connection (whichever worker takes it): metric family name -> its samples."""
    conn = tsa.connection()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _requests_total(families: dict[str, list[Sample]]) -> int:
    return round(sum(s.value for s in families["stampd_requests"] if s.name == "stampd_requests_total"))


def _worker_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_two_workers_reload_in_place_under_load_sum_metrics_and_stop_cleanly(tsa_factory: TsaFactory) -> None:
    """OPS-09, STS-02, issue 6 (configuration: SIGHUP reloads without dropping requests, SIGTERM drains and exits
    cleanly; observability: /metrics) with `stampd serve --workers 2`: six client threads send requests without
    pause over keep-alive connections while the server gets SIGHUP three times (adding TSU b, then c, then the same
    file again). No request fails; the idle keep-alive connections opened before the first SIGHUP still answer
    after the last (uvicorn's own SIGHUP replaced the workers and closed them); both workers reload in place (one
    `config.reloaded` per worker and SIGHUP, no worker started again) and each TSU added serves on both workers
    (tokens of each TSU in both workers' chains). Every scrape of /metrics, whichever worker answers it, sums
    `stampd_requests_total` over the workers to exactly the requests sent, and the gauges come once per label
    set, not once per worker. SIGTERM: exit status 0, both workers record `service.stopped`, and the private
    metrics directory (0700) is removed."""
    tsa = tsa_factory("ec-p256", name="workers-reload", workers=2, before_start=_tsus_a_b_c)
    process = tsa.process
    assert process is not None
    tsa.process = None  # stopped by this test: the fixture would accept death by SIGTERM as a clean stop
    try:
        full = (tsa.dir / "full.toml").read_text()
        _wait_for(lambda: len(_event_chains(tsa, "service.started")) == 2, 30, "both workers started")
        workers = _event_chains(tsa, "service.started")
        pids = [
            int(json.loads(str(detail))["pid"])
            for (detail,) in tsa._query("SELECT detail FROM events WHERE kind = 'service.started'")
        ]
        metrics_directory = Path(_worker_environment(pids[0])["PROMETHEUS_MULTIPROC_DIR"])
        assert _worker_environment(pids[1])["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_directory)
        assert metrics_directory.stat().st_mode & 0o777 == 0o700

        idle = [tsa.connection() for _ in range(IDLE_CONNECTIONS)]
        idle_sockets = []
        paths = ["/a", "/"]
        with KeepAliveLoad(tsa, paths) as load:
            for conn in idle:
                load.record(_granted_or_why(tsa, "/a", conn))
                idle_sockets.append(conn.sock)
            _wait_for(lambda: load.count() > 50, 15, "the first requests")
            for reload, tsus in enumerate(({"a", "b"}, {"a", "b", "c"}, {"a", "b", "c"}), start=1):
                tsa.config.write_text(_only_tsus(full, tsus))
                for conn in idle:  # each idle connection took a request just before this SIGHUP
                    load.record(_granted_or_why(tsa, "/a", conn))
                before = load.count()
                process.send_signal(signal.SIGHUP)
                _wait_for(lambda n=reload: len(_event_chains(tsa, "config.reloaded")) == 2 * n, 20, f"reload {reload}")
                paths[:] = ["/a", "/", *sorted(f"/{name}" for name in tsus - {"a"})]
                _wait_for(lambda n=before: load.count() > n + 60, 15, f"requests after reload {reload}")
            for conn in idle:
                load.record(_granted_or_why(tsa, "/a", conn))
        assert not load.failures, f"{len(load.failures)} of {load.sent} requests failed: {load.failures[:5]}"
        assert [conn.sock for conn in idle] == idle_sockets, "an idle keep-alive connection was closed by a reload"
        for conn in idle:
            conn.close()

        assert sorted(_event_chains(tsa, "config.reloaded")) == sorted(workers * 3), "each worker reloaded each time"
        assert _event_chains(tsa, "service.started") == workers, "no worker was started again"
        assert not _event_chains(tsa, "config.reload_failed")
        issued = set(tsa._query("SELECT DISTINCT tsu, chain FROM tokens"))
        assert issued == {(tsu, chain) for tsu in "abc" for chain in workers}, "every TSU served by every worker"

        _wait_for(lambda: _requests_total(_scrape(tsa)) == load.sent, 10, "the counts of the last requests")
        for _ in range(6):
            families = _scrape(tsa)
            assert _requests_total(families) == load.sent
            durations = [s for s in families["stampd_request_duration_seconds"] if s.name.endswith("_count")]
            assert round(sum(s.value for s in durations)) == load.sent
            active = sorted((sorted(s.labels.items()), s.value) for s in families["stampd_tsu_active"])
            assert active == [([("tsu", t)], 1.0) for t in "abc"], "one sample per TSU, not one per worker"
            readiness = sorted((s.labels["check"], s.value) for s in families["stampd_readiness"])
            assert readiness == [("clock", 1.0), ("keys", 1.0), ("records", 1.0), ("tsus", 1.0)]
    except BaseException:
        process.send_signal(signal.SIGTERM)  # a failed run leaves no server behind (SIGKILL would orphan workers)
        process.wait(30)
        raise

    process.send_signal(signal.SIGTERM)
    returncode = process.wait(30)
    log = tsa.log_text()
    assert returncode == 0, f"exit status {returncode}:\n{log[-3000:]}"
    assert sorted(_event_chains(tsa, "service.stopped")) == sorted(workers), "both workers drained and stopped"
    assert "Traceback" not in log
    assert not metrics_directory.exists(), "the metrics directory outlived the server"
    tsa.check_granted_are_recorded()


def _granted_in_batches(tsa: LiveTsa, count: int) -> list[str]:
    """``count`` requests from 4 threads, a new connection every ``RECONNECT_EVERY``: the failures."""

    def batch(size: int) -> list[str]:
        failures = []
        for start in range(0, size, RECONNECT_EVERY):
            conn = tsa.connection()
            try:
                for _ in range(min(RECONNECT_EVERY, size - start)):
                    failure = _granted_or_why(tsa, "/", conn)
                    if failure is not None:
                        failures.append(failure)
            finally:
                conn.close()
        return failures

    with ThreadPoolExecutor(4) as pool:
        return [f for failures in pool.map(batch, [count // 4] * 4) for f in failures]


def test_a_killed_worker_is_replaced_and_its_counts_stay_in_the_metrics(tsa_factory: TsaFactory) -> None:
    """Issue 6 (observability) with `stampd serve --workers 2`: a worker killed with SIGKILL is replaced by the
    supervisor, which serves at once; /metrics still counts the requests the dead worker answered (its counter
    files stay) while its gauges are dropped (its live-gauge files are removed), so every gauge still comes once
    per label set."""
    tsa = tsa_factory("ec-p256", name="workers-killed", workers=2)
    assert not _granted_in_batches(tsa, 200)
    _wait_for(lambda: len(_event_chains(tsa, "service.started")) == 2, 30, "both workers started")
    _wait_for(lambda: _requests_total(_scrape(tsa)) == 200, 10, "the counts of the first requests")
    pids = [
        int(json.loads(str(detail))["pid"])
        for (detail,) in tsa._query("SELECT detail FROM events WHERE kind = 'service.started'")
    ]
    metrics_directory = Path(_worker_environment(pids[0])["PROMETHEUS_MULTIPROC_DIR"])
    victim = pids[0]
    assert list(metrics_directory.glob(f"gauge_live*_{victim}.db")), "the worker had gauges"

    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(_event_chains(tsa, "service.started")) == 3, 30, "a new worker")
    _wait_for(lambda: not list(metrics_directory.glob(f"gauge_live*_{victim}.db")), 10, "the dead worker's gauges")
    assert list(metrics_directory.glob(f"counter_{victim}.db")), "the dead worker's counts were kept"
    assert not _granted_in_batches(tsa, 200)
    _wait_for(lambda: _requests_total(_scrape(tsa)) == 400, 10, "the counts of every request")
    families = _scrape(tsa)
    assert [(s.labels, s.value) for s in families["stampd_tsu_active"]] == [({"tsu": "default"}, 1.0)]
