"""Signals on a live `stampd serve` under load (issue 6, configuration): SIGHUP reloads the TSUs without failing a
request, SIGTERM drains the requests in flight and exits with status 0.

The clients speak HTTP/1.1 on raw keep-alive sockets, so that a response cut mid-way (some bytes, then the end of
the connection) is told apart from a connection closed before any byte of a response (SPEC OPS-09: a token that
left the server is in the records; TRN-02: a reply is a whole HTTP response or none).
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from stampd.der.request import encode_request
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.verify import verify_timestamp

sys.path.insert(0, str(Path(__file__).parent))

from conftest import LiveTsa, TimeStampResp, TsaFactory, run_stampd

pytestmark = pytest.mark.integration

CLIENTS = 6


@dataclass(frozen=True)
class Outcome:
    """One request: ``ok`` (a whole response), ``refused`` (no connection), ``closed`` (the connection ended
    before any byte of a response), ``cut`` (it ended inside a response) or ``timeout``."""

    kind: str
    path: str
    digest: bytes
    status: int | None = None
    body: bytes = b""


def _query(digest: bytes) -> bytes:
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, secrets.randbits(62), True, ())
    return encode_request(request)


def _exchange(sock: socket.socket, path: str, digest: bytes) -> Outcome:
    body = _query(digest)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: stampd\r\nContent-Type: application/timestamp-query\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    try:
        sock.sendall(head.encode() + body)
    except OSError:
        return Outcome("closed", path, digest)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return Outcome("timeout", path, digest, body=data)
        except OSError:  # reset: the same as the end of the connection
            chunk = b""
        if not chunk:
            return Outcome("cut" if data else "closed", path, digest, body=data)
        data += chunk
        header, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            continue
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        if len(rest) >= length:
            return Outcome("ok", path, digest, status, rest[:length])


@dataclass
class Load:
    """``CLIENTS`` threads, each on its own keep-alive connection (reconnecting when the server closes it),
    until stopped or until the server refuses connections."""

    tsa: LiveTsa
    paths: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    def _connect(self) -> socket.socket | None:
        try:
            return socket.create_connection((self.tsa.host, self.tsa.port), timeout=15)
        except ConnectionRefusedError:
            return None

    def _client(self, index: int) -> None:
        sock = self._connect()
        i = index
        while not self.stop.is_set():
            if sock is None:
                with self.lock:
                    self.outcomes.append(Outcome("refused", "", b""))
                return
            path = self.paths[i % len(self.paths)]
            i += 1
            outcome = _exchange(sock, path, secrets.token_bytes(32))
            if outcome.kind == "ok" and outcome.status == 200:
                self.tsa.remember(outcome.body)
            with self.lock:
                self.outcomes.append(outcome)
            if outcome.kind != "ok":
                sock.close()
                sock = self._connect()
        if sock is not None:
            sock.close()

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)


def _without_tsu(text: str, name: str) -> str:
    """The configuration without the [tsu.NAME] table and its sub-tables."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            table = line.strip().strip("[]")
            skipping = table == f"tsu.{name}" or table.startswith(f"tsu.{name}.")
        if not skipping:
            kept.append(line)
    return "".join(kept)


def _events(tsa: LiveTsa, kind: str) -> list[dict[str, object]]:
    return [json.loads(str(d)) for (d,) in tsa._query(f"SELECT detail FROM events WHERE kind = '{kind}' ORDER BY id")]


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _post_status(tsa: LiveTsa, path: str) -> int:
    status, _, _ = tsa.post(_query(secrets.token_bytes(32)), path=path)
    return status


def _assert_granted_and_verified(tsa: LiveTsa, outcomes: list[Outcome]) -> int:
    """Every whole 200 response is a granted token that verifies for its own digest; returns how many."""
    anchors = [x509.load_pem_x509_certificate(tsa.root_pem.read_bytes())]
    extra = [x509.load_pem_x509_certificate(tsa.issuing_pem.read_bytes())]
    granted = [o for o in outcomes if o.kind == "ok" and o.status == 200]
    for outcome in granted:
        status = TimeStampResp.load(outcome.body)["status"]["status"].native
        assert status == "granted", (outcome.path, status)
        report = verify_timestamp(outcome.body, digest=outcome.digest, anchors=anchors, extra_certs=extra)
        assert report.ok, [f"{c.name}: {c.detail}" for c in report.failures]
    return len(granted)


def _tsus_a_and_b(tsa: LiveTsa) -> None:
    """`stampd init --tsu a --tsu b`, kept aside as full.toml; the server starts with TSU a only."""
    listen = f"{tsa.host}:{tsa.port}"
    run_stampd("init", tsa.dir, "--key-type", tsa.key_type, "--listen", listen, "--tsu", "a", "--tsu", "b", "--force")
    full = tsa.config.read_text()
    (tsa.dir / "full.toml").write_text(full)
    tsa.config.write_text(_without_tsu(full, "b"))


def test_sighup_five_times_under_load_fails_no_request(tsa_factory: TsaFactory) -> None:
    """Six keep-alive clients send requests without pause while the configuration gains and loses a TSU and the
    server gets SIGHUP five times: every request is answered 200 with a granted token that verifies and is in the
    records, each reload is recorded (`config.reloaded`), and the TSU added is served at once."""
    tsa = tsa_factory("ec-p256", name="signals-reload", before_start=_tsus_a_and_b)
    assert tsa.process is not None
    full = (tsa.dir / "full.toml").read_text()
    partial = _without_tsu(full, "b")
    assert _post_status(tsa, "/b") == 404
    with Load(tsa, ["/a", "/"]) as load:
        _wait_for(lambda: load.count() > 20, 10, "the first requests")
        for reload in range(1, 6):
            with_b = reload % 2 == 1
            tsa.config.write_text(full if with_b else partial)
            before = load.count()
            tsa.process.send_signal(signal.SIGHUP)
            _wait_for(lambda n=reload: len(_events(tsa, "config.reloaded")) == n, 10, f"reload {reload}")
            assert _post_status(tsa, "/b") == (200 if with_b else 404)
            _wait_for(lambda n=before: load.count() > n + 20, 10, f"requests after reload {reload}")
    outcomes = load.outcomes
    failed = [(o.kind, o.path, o.status, o.body[:80]) for o in outcomes if o.kind != "ok" or o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed during the reloads: {failed[:5]}"
    assert _assert_granted_and_verified(tsa, outcomes) == len(outcomes) > 100
    tsa.check_granted_are_recorded()
    tsus = [event["tsus"] for event in _events(tsa, "config.reloaded")]
    assert tsus == [["a", "b"], ["a"], ["a", "b"], ["a"], ["a", "b"]]
    assert not _events(tsa, "config.reload_failed")


def test_sigterm_under_load_drains_and_exits_with_status_0(tsa_factory: TsaFactory) -> None:
    """SIGTERM while six keep-alive clients send requests: every request gets a whole 200 response with a
    granted token that verifies and is in the records, or its connection is refused or closed before any byte of
    a response; none is cut mid-way. The server exits with status 0 and records `service.stopped`."""
    tsa = tsa_factory("ec-p256", name="signals-term")
    process = tsa.process
    assert process is not None
    tsa.process = None  # stopped here, not by the fixture (which accepts death by SIGTERM as a clean stop)
    with Load(tsa, ["/"]) as load:
        _wait_for(lambda: load.count() > 200, 15, "requests before SIGTERM")
        process.send_signal(signal.SIGTERM)
        signalled_at = load.count()
        returncode = process.wait(30)
        _wait_for(lambda: all(not t.is_alive() for t in load.threads), 30, "every client to see the server gone")
    outcomes = load.outcomes
    kinds = {kind: sum(o.kind == kind for o in outcomes) for kind in ("ok", "refused", "closed", "cut", "timeout")}
    log = tsa.log_text()
    assert returncode == 0, f"exit status {returncode}:\n{log[-3000:]}"
    assert kinds["cut"] == kinds["timeout"] == 0, (kinds, [o for o in outcomes if o.kind in ("cut", "timeout")][:3])
    assert kinds["refused"] == CLIENTS, kinds  # each client ends when the server is gone
    assert all(o.status == 200 for o in outcomes if o.kind == "ok")
    assert _assert_granted_and_verified(tsa, outcomes) == kinds["ok"] >= signalled_at - CLIENTS
    tsa.check_granted_are_recorded()
    assert process.pid in [event["pid"] for event in _events(tsa, "service.stopped")]
    assert "Application shutdown complete" in log and "Traceback" not in log
