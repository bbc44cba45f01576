"""The uvicorn options of `stampd serve`: the client address is stampd's to decide (server.trusted_proxies), and
native TLS offers TLS 1.2 or later with forward-secret AEAD cipher suites only. With several workers, the
supervisor passes SIGHUP on to the workers and gives them a private directory for their shared metrics.

Issue 6 (trusted proxies, TLS client certificates); SPEC TRN-01.
"""

from __future__ import annotations

import datetime
import os
import signal
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from uvicorn.config import STARTUP_FAILURE, create_ssl_context
from uvicorn.supervisors.multiprocess import SIGNALS

from stampd.config import CONFIG_ENV, Config, TlsConfig, load_config
from stampd.errors import StampdError
from stampd.metrics import SHARED_DIRECTORY_ENV
from stampd.server import run
from stampd.server.run import serve, tls_options

MINIMAL = """\
[server]
[tsu.default]
certificate = "pki/tsu.pem"
trust_anchor = "pki/root.pem"
default_policy = "2.25.7"
[tsu.default.key]
path = "pki/tsu-key.pem"
passphrase_file = "secrets/tsu.pass"
"""


def _config(tmp_path: Path, server: str = "") -> Config:
    path = tmp_path / "stampd.toml"
    path.write_text(MINIMAL.replace("[server]\n", f"[server]\n{server}", 1))
    return load_config(path)


def _server_files(directory: Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def _server_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The context uvicorn builds from ``options``, as it does when it starts."""
    return create_ssl_context(
        options["ssl_certfile"],
        options["ssl_keyfile"],
        options.get("ssl_keyfile_password"),
        options["ssl_version"],
        options.get("ssl_cert_reqs", ssl.CERT_NONE),
        options.get("ssl_ca_certs"),
        options["ssl_ciphers"],
    )


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str] | None:
    """A TLS handshake in memory: the protocol and cipher agreed, or None when the server refused the client."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(c_in, c_out, server_side=False)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, tls, out, peer_in in (("client", client_side, c_out, s_in), ("server", server_side, s_out, c_in)):
            if not done[side]:
                try:
                    tls.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return None
            peer_in.write(out.read())
        if all(done.values()):
            cipher = client_side.cipher()
            assert cipher is not None
            return str(client_side.version()), cipher[0]
    return None


def _old_client(*, maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client willing to go as low as asked (security level 0, so that this side never refuses first)."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        client.maximum_version = maximum
    return client


def test_native_tls_offers_tls_1_2_or_later_with_forward_secret_aead_suites_only(tmp_path: Path) -> None:
    """The context uvicorn builds from tls_options: minimum TLS 1.2; every TLS 1.2 suite ECDHE or DHE with GCM or
    ChaCha20-Poly1305; a TLS 1.1 client and a TLS 1.2 client offering only CBC suites are refused in a real
    handshake, a modern client gets TLS 1.3. The key's passphrase comes from its file."""
    (tmp_path / "tls.pass").write_text("tls key passphrase\n")
    certificate, key = _server_files(tmp_path, b"tls key passphrase")
    options = tls_options(TlsConfig(certificate, key, tmp_path / "tls.pass"))
    assert options["ssl_keyfile_password"] == "tls key passphrase"
    server = _server_context(options)
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suite at all"
    for cipher in tls12:
        assert cipher["kea"] in ("kx-ecdhe", "kx-dhe") and cipher["aead"], cipher["name"]

    assert _handshake(server, _old_client(maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL")) is None
    cbc_only = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA"
    assert _handshake(server, _old_client(maximum=ssl.TLSVersion.TLSv1_2, ciphers=cbc_only)) is None
    gcm = _old_client(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert _handshake(server, gcm) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    modern = ssl.create_default_context()
    modern.check_hostname, modern.verify_mode = False, ssl.CERT_NONE
    agreed = _handshake(server, modern)
    assert agreed is not None and agreed[0] == "TLSv1.3"


def test_uvicorn_never_rewrites_the_client_address_from_proxy_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 and ::1 by default (proxy_headers): it would rewrite the
    client address before stampd's own server.trusted_proxies check sees it, so that any local process could
    claim a subscriber's address. `stampd serve` turns it off; TimeStampApp reads the header itself."""
    given: dict[str, Any] = {}

    class Server:
        def __init__(self, config: uvicorn.Config) -> None:
            given["config"] = config

        def run(self) -> None:
            return None

    monkeypatch.setattr(run.uvicorn, "Server", Server)
    config = _config(tmp_path, 'trusted_proxies = ["10.0.0.1/32"]\n')
    serve(config, object(), host="127.0.0.1", port=0, workers=1)  # type: ignore[arg-type]
    assert given["config"].proxy_headers is False


class FakeWorker:
    """A worker process as the supervisor sees it: alive, and serving once ``ready``."""

    def __init__(self, pid: int, *, ready: bool = True, exitcode: int | None = None) -> None:
        self.pid = pid
        self.ready = ready
        self.exitcode = exitcode

    def is_ready(self, timeout: float = 5) -> bool:
        return self.ready

    def is_alive(self, timeout: float = 5) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        return None

    def join(self) -> None:
        return None


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[run.WorkerSupervisor, list[Any]]]:
    """A WorkerSupervisor with fake workers 11 (serving) and 12 (starting); signals sent and gauges dropped are
    recorded in the list instead. The signal handlers it installs are put back afterwards."""
    saved = {number: signal.getsignal(number) for number in SIGNALS}
    sent: list[Any] = []
    monkeypatch.setattr(run.os, "kill", lambda pid, number: sent.append((pid, number)))
    monkeypatch.setattr(run, "forget_worker", lambda directory, pid: sent.append(("forget", directory, pid)))
    config = uvicorn.Config(run.FACTORY, factory=True, workers=2, log_config=None)
    try:
        supervising = run.WorkerSupervisor(config, [], str(tmp_path))
        supervising.processes = [FakeWorker(11), FakeWorker(12, ready=False)]  # type: ignore[list-item]
        supervising.keep_subprocess_alive()
        yield supervising, sent
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_sighup_is_passed_on_to_each_worker_once_it_serves(
    supervisor: tuple[run.WorkerSupervisor, list[Any]],
) -> None:
    """Issue 6 (SIGHUP reloads without dropping requests), with several workers: the supervisor sends SIGHUP to
    each worker, which reloads in place, instead of replacing the workers; a worker still starting (before its
    handler exists SIGHUP would end it) gets it as soon as it serves, and only once."""
    supervising, sent = supervisor
    supervising.handle_hup()
    assert sent == [(11, signal.SIGHUP)]
    supervising.keep_subprocess_alive()
    assert sent == [(11, signal.SIGHUP)], "a worker still starting is left alone"
    supervising.processes[1].ready = True  # type: ignore[attr-defined]
    supervising.keep_subprocess_alive()
    supervising.keep_subprocess_alive()
    assert sent == [(11, signal.SIGHUP), (12, signal.SIGHUP)]


def test_a_replaced_worker_has_its_gauges_dropped_and_owes_no_reload(
    supervisor: tuple[run.WorkerSupervisor, list[Any]], tmp_path: Path
) -> None:
    """A worker that is gone (uvicorn replaced it after it died) has its gauges dropped from the shared metrics
    directory; a reload it owed is not sent to the pid again, and its replacement, which read the configuration
    itself, is not signalled."""
    supervising, sent = supervisor
    supervising.handle_hup()
    supervising.processes[1] = FakeWorker(13)  # type: ignore[call-overload]
    supervising.keep_subprocess_alive()
    assert sent == [(11, signal.SIGHUP), ("forget", str(tmp_path), 12)]


def test_a_worker_that_fails_to_start_makes_serve_fail(
    supervisor: tuple[run.WorkerSupervisor, list[Any]],
) -> None:
    """uvicorn stops every worker when one fails before serving (a restart would fail the same way) and returns
    quietly; the supervisor remembers it, so that `stampd serve` exits with an error instead of status 0."""
    supervising, _ = supervisor
    assert not supervising.worker_failed_to_start
    supervising.processes[1] = FakeWorker(12, exitcode=STARTUP_FAILURE)  # type: ignore[call-overload]
    supervising.keep_subprocess_alive()
    assert supervising.should_exit.is_set()
    assert supervising.worker_failed_to_start


def test_several_workers_share_a_private_metrics_directory_removed_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 6 (observability), several workers: `serve` makes a new directory only its user can read (0700),
    names it to the workers in PROMETHEUS_MULTIPROC_DIR while they run, removes it when they have stopped and
    puts the environment back; a worker that failed to start makes `serve` raise."""
    seen: dict[str, Any] = {}

    def run_supervisor(self: run.WorkerSupervisor) -> None:
        directory = Path(os.environ[SHARED_DIRECTORY_ENV])
        (directory / "counter_1.db").write_bytes(b"")
        seen["directory"], seen["mode"] = directory, directory.stat().st_mode & 0o777
        seen["same"] = self._metrics_directory == str(directory)
        self.worker_failed_to_start = seen.get("fail", False)

    monkeypatch.setattr(run.WorkerSupervisor, "run", run_supervisor)
    monkeypatch.setattr(uvicorn.Config, "bind_socket", lambda self: None)
    monkeypatch.setenv(SHARED_DIRECTORY_ENV, "/elsewhere")
    monkeypatch.setenv(CONFIG_ENV, "")  # serve names the configuration to the workers here
    saved = {number: signal.getsignal(number) for number in SIGNALS}
    try:
        serve(_config(tmp_path), object(), host="127.0.0.1", port=0, workers=2)  # type: ignore[arg-type]
        assert seen["mode"] == 0o700 and seen["same"]
        assert not seen["directory"].exists()
        assert os.environ[SHARED_DIRECTORY_ENV] == "/elsewhere"
        seen["fail"] = True
        with pytest.raises(StampdError, match="a worker process failed to start"):
            serve(_config(tmp_path), object(), host="127.0.0.1", port=0, workers=2)  # type: ignore[arg-type]
        assert not seen["directory"].exists()
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
