"""Live TSAs for the integration tests: `stampd init` into a temporary directory, `stampd serve` as a real
subprocess on a free loopback port, torn down with SIGTERM at the end of the session.

Every server is shared by the whole session (one per configuration), so the suite pays each key generation and
each start-up once. At teardown each server must exit with status 0 and without a traceback in its log, and every
token a test saw granted must be in its records, byte for byte (SPEC OPS-09).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from asn1crypto import cms, core, tsp

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
TIMESTAMP_QUERY = "application/timestamp-query"


def stampd_command() -> list[str]:
    """How to run the `stampd` command of the interpreter running the tests (its console script if installed)."""
    script = Path(sys.executable).with_name("stampd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from stampd.cli.main import main; sys.argv[0] = 'stampd'; main()"]


def run_stampd(
    *args: str | os.PathLike[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*stampd_command(), *map(str, args)], capture_output=True, text=True, check=check, timeout=timeout
    )


def free_loopback_port() -> int:
    """A port nobody listens on right now: bind port 0 and let the kernel choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveTsa:
    """One running `stampd serve` and the directory `stampd init` made for it."""

    name: str
    key_type: str
    rsa_pss: bool
    dir: Path
    host: str
    port: int
    workers: int = 1
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    granted: dict[int, bytes] = field(default_factory=dict)
    """serial -> the exact reply bytes of every token a test was granted (checked against the records)."""
    check_records: bool = True
    """False for a TSA whose records a test destroys on purpose: skips the records and events checks at teardown."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def config(self) -> Path:
        return self.dir / "stampd.toml"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def root_pem(self) -> Path:
        return self.pki / "root.pem"

    @property
    def issuing_pem(self) -> Path:
        return self.pki / "issuing-ca.pem"

    @property
    def tsu_pem(self) -> Path:
        return self.pki / "tsu.pem"

    @property
    def chain_pem(self) -> Path:
        return self.pki / "chain.pem"

    @property
    def records_db(self) -> Path:
        return self.dir / "records.sqlite3"

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(
        self,
        body: bytes,
        *,
        content_type: str | None = TIMESTAMP_QUERY,
        path: str = "/",
        conn: http.client.HTTPConnection | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """POST ``body``; returns (HTTP status, headers, body). Granted tokens are remembered for the records check."""
        own = conn is None
        c = conn or self.connection()
        try:
            headers = {"Content-Type": content_type} if content_type is not None else {}
            c.request("POST", path, body=body, headers=headers)
            response = c.getresponse()
            data = response.read()
        finally:
            if own:
                c.close()
        if response.status == 200 and response.getheader("Content-Type") == "application/timestamp-reply":
            self.remember(data)
        return response.status, response.headers, data

    def timestamp(self, query: bytes, conn: http.client.HTTPConnection | None = None) -> bytes:
        """POST a query that must be answered 200 with a reply; returns the DER TimeStampResp."""
        status, headers, data = self.post(query, conn=conn)
        assert status == 200, (status, data)
        assert headers["Content-Type"] == "application/timestamp-reply"
        return data

    def remember(self, reply: bytes) -> None:
        resp = TimeStampResp.load(reply)
        if resp["status"]["status"].native in ("granted", "granted_with_mods"):
            serial = resp["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed["serial_number"]
            with self._lock:
                self.granted[serial.native] = reply

    def stampd(self, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `stampd` subcommand against this TSA's configuration."""
        return run_stampd(*args, "-c", self.config, check=check)

    def run(self, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `stampd` subcommand that does not take a configuration (stamp, verify)."""
        return run_stampd(*args, check=check)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    # --- life cycle ---

    def start(self, workers: int = 1) -> None:
        self.workers = workers
        self.log = self.dir / f"serve-{self.port}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *stampd_command(),
                    "serve",
                    "-c",
                    str(self.config),
                    "--listen",
                    f"{self.host}:{self.port}",
                    "--workers",
                    str(workers),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"stampd serve exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                c = self.connection(timeout=2)
                c.request("GET", "/healthz")
                r = c.getresponse()
                ok = r.status == 200 and r.read() == b"ok\n"
                c.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop(check=False)
        raise RuntimeError(f"stampd serve did not answer /healthz in {START_TIMEOUT_S} s:\n{self.log_text()}")

    def stop(self, check: bool = True) -> None:
        """SIGTERM, wait, SIGKILL on timeout; with ``check``, the server must have exited cleanly."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                if check:
                    pytest.fail(f"stampd serve ({self.name}) ignored SIGTERM for {STOP_TIMEOUT_S} s")
        if check:
            log = self.log_text()
            # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal it captured, so a clean stop
            # ends with -SIGTERM (or 0): the log and the events table tell a clean stop from a crash.
            assert process.returncode in (0, -signal.SIGTERM), f"{self.name}: exit status {process.returncode}:\n{log}"
            assert "Application shutdown complete" in log, f"{self.name}: no graceful shutdown:\n{log}"
            assert "Traceback" not in log, f"{self.name}: the server logged a traceback:\n{log}"
            if self.check_records and self.workers == 1:  # one process: the pid in the events is the server's
                stopped = [
                    json.loads(str(detail))["pid"]
                    for (detail,) in self._query("SELECT detail FROM events WHERE kind = 'service.stopped'")
                ]
                assert process.pid in stopped, f"{self.name}: no service.stopped event for pid {process.pid}"

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        db = sqlite3.connect(f"file:{self.records_db}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def records(self) -> dict[int, bytes]:
        """serial -> token bytes of every row in the records (read directly, as an auditor would)."""
        return {int(str(serial), 16): bytes(token) for serial, token in self._query("SELECT serial, token FROM tokens")}

    def check_granted_are_recorded(self) -> None:
        """SPEC OPS-09 / GUIDE habit 13: every token that left the server is in the records, byte for byte."""
        if not self.granted:
            return
        recorded = self.records()
        missing = [hex(s) for s in self.granted if s not in recorded]
        assert not missing, f"{self.name}: granted tokens missing from the records: {missing[:5]}"
        different = [hex(s) for s, reply in self.granted.items() if recorded[s] != reply]
        assert not different, f"{self.name}: recorded tokens differ from the replies sent: {different[:5]}"


class TimeStampResp(core.Sequence):
    """RFC 3161 §2.4.2 TimeStampResp; asn1crypto's own forgets that timeStampToken is OPTIONAL."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


TsaFactory = Callable[..., LiveTsa]


@pytest.fixture(scope="session")
def tsa_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TsaFactory]:
    """``start(key_type, *, rsa_pss=False, name=None, workers=1, config_edit=None, before_start=None,
    share_dir_with=None)``.

    Servers are cached by ``name`` (default: the key type, plus ``-pss``), so tests that ask for the same TSA share
    one server. ``config_edit`` rewrites the generated stampd.toml text and ``before_start(tsa)`` prepares the
    directory (e.g. the records database) before `stampd serve` starts; both make a TSA of its own and need a name.
    ``share_dir_with`` starts one more `stampd serve` process on another TSA's directory, configuration and records.
    """
    started: dict[str, LiveTsa] = {}

    def start(
        key_type: str,
        *,
        rsa_pss: bool = False,
        name: str | None = None,
        workers: int = 1,
        config_edit: Callable[[str], str] | None = None,
        before_start: Callable[[LiveTsa], None] | None = None,
        share_dir_with: LiveTsa | None = None,
    ) -> LiveTsa:
        if name is None:
            assert config_edit is None and before_start is None, "a customised TSA needs a name of its own"
            name = key_type + ("-pss" if rsa_pss else "") + (f"-w{workers}" if workers != 1 else "")
        if name in started:
            return started[name]
        directory = share_dir_with.dir if share_dir_with else tmp_path_factory.mktemp(f"tsa-{name}")
        tsa = LiveTsa(
            name=name, key_type=key_type, rsa_pss=rsa_pss, dir=directory, host="127.0.0.1", port=free_loopback_port()
        )
        if share_dir_with is None:
            init = ["init", directory, "--key-type", key_type, "--listen", f"{tsa.host}:{tsa.port}", "--force"]
            run_stampd(*init, *(["--rsa-pss"] if rsa_pss else []))
        if config_edit is not None:
            tsa.config.write_text(config_edit(tsa.config.read_text()))
        if before_start is not None:
            before_start(tsa)
        tsa.start(workers=workers)
        started[name] = tsa
        return tsa

    yield start

    failures: list[str] = []
    for tsa in started.values():
        try:
            tsa.stop()
            if tsa.check_records:
                tsa.check_granted_are_recorded()
        except (AssertionError, pytest.fail.Exception) as e:
            failures.append(str(e))
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.fixture(scope="session")
def ec_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """ECDSA P-256 TSU (ecdsa-with-SHA256)."""
    return tsa_factory("ec-p256")


@pytest.fixture(scope="session")
def rsa_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """RSA-3072 TSU, PKCS#1 v1.5 with SHA-256."""
    return tsa_factory("rsa-3072")


@pytest.fixture(scope="session")
def pss_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """RSA-3072 TSU signing with RSASSA-PSS (and a PSS-signed demo chain)."""
    return tsa_factory("rsa-3072", rsa_pss=True)


@pytest.fixture(scope="session")
def ed25519_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """Ed25519 TSU (RFC 8419: SHA-512 message digest)."""
    return tsa_factory("ed25519")


@pytest.fixture(scope="session")
def p384_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """ECDSA P-384 TSU (ecdsa-with-SHA384)."""
    return tsa_factory("ec-p384")


@pytest.fixture(scope="session")
def rsa4096_tsa(tsa_factory: TsaFactory) -> LiveTsa:
    """RSA-4096 TSU, PKCS#1 v1.5 with SHA-256 (key generation costs about 2 s)."""
    return tsa_factory("rsa-4096")


KEY_TSAS = ["ec_tsa", "p384_tsa", "rsa_tsa", "rsa4096_tsa", "pss_tsa", "ed25519_tsa"]
"""Fixture names of the TSAs of every key type, for ``indirect`` parametrisation via :func:`any_tsa`."""


@pytest.fixture(params=KEY_TSAS)
def any_tsa(request: pytest.FixtureRequest) -> LiveTsa:
    """Each key type's TSA in turn."""
    return request.getfixturevalue(request.param)
