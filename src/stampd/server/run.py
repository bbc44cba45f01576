"""Run the ASGI application under uvicorn, in one or several worker processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Iterator
from socket import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from stampd.config import CONFIG_ENV, Config, TlsConfig
from stampd.errors import ConfigError, StampdError
from stampd.logs import log_config
from stampd.metrics import SHARED_DIRECTORY_ENV, forget_worker
from stampd.server.asgi import TimeStampApp
from stampd.server.protocol import TimeStampHttpProtocol

FACTORY = "stampd.app:create_app_from_environment"

READY_PROBE_S = 0.5
"""How long the supervisor waits for a worker to say whether it serves yet, before it passes SIGHUP on to it."""

log = logging.getLogger("stampd")

LOG_CONFIG: dict[str, Any] = log_config("json")
"""Applied in the serving process until its configuration is read (then ``log_config(server.log_format)``, which
uvicorn applies again in every worker process): JSON lines, the default ``[server] log_format``."""


TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)
"""The TLS 1.2 cipher suites offered (TLS 1.3's are all sound): forward secrecy and AEAD only, Mozilla's
"intermediate" list. Set explicitly, because older uvicorn releases default to OpenSSL's "TLSv1" list (CBC with
SHA-1, anonymous and NULL suites)."""


def serve(config: Config, app: TimeStampApp, *, host: str, port: int, workers: int) -> None:
    """Serve until SIGINT/SIGTERM.

    With one worker ``app`` is served as it is; with several, ``app`` proved the configuration loads, and each
    worker process builds its own from the same file (its own record writer included), under a
    :class:`WorkerSupervisor`, with the metrics shared through a private directory that lives as long as it does.
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": TimeStampHttpProtocol,
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        # stampd reads X-Forwarded-For itself, only from server.trusted_proxies (TimeStampApp). uvicorn's own
        # handling would otherwise rewrite the client address first, believing any loopback peer by default.
        "proxy_headers": False,
        "timeout_keep_alive": max(1, round(config.server.request_timeout_s)),
        "log_config": log_config(config.server.log_format),
    }
    options.update(tls_options(config.server.tls))
    if workers == 1:
        with _drained_sigterm_exits_cleanly():
            uvicorn.Server(uvicorn.Config(app, **options)).run()
        return
    os.environ[CONFIG_ENV] = str(config.source.resolve())
    uvicorn_config = uvicorn.Config(FACTORY, factory=True, workers=workers, **options)
    with _shared_metrics_directory() as metrics_directory:
        supervisor = WorkerSupervisor(uvicorn_config, [uvicorn_config.bind_socket()], metrics_directory)
        supervisor.run()
    if supervisor.worker_failed_to_start:
        raise StampdError("a worker process failed to start (its log says why): stopped")


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor of the worker processes (it restarts a worker that dies or hangs, and on SIGTERM or
    SIGINT stops them all, each draining its requests), with two differences.

    SIGHUP is passed on to each worker, which reloads its TSUs and subscribers in place (`app.create_app`'s reload,
    as one process does): uvicorn would replace every worker instead, closing their keep-alive connections. A
    worker still starting gets the signal once it serves (its handler is installed by then; before, SIGHUP would
    end it); one that is replaced meanwhile reads the file afresh anyway.

    A worker that is gone has its gauges dropped from the shared metrics (:func:`stampd.metrics.forget_worker`).
    """

    def __init__(self, config: uvicorn.Config, sockets: list[socket], metrics_directory: str) -> None:
        super().__init__(config, sockets)
        self._metrics_directory = metrics_directory
        self._reload_due: set[int] = set()
        """Workers that owe a reload: signalled as soon as they serve."""
        self._known: set[int] = set()
        self.worker_failed_to_start = False
        """True when a worker failed before serving: uvicorn then stops every worker (a restart would fail too)."""

    def handle_hup(self) -> None:
        log.warning("SIGHUP: each worker process reloads its TSUs and subscribers")
        self._reload_due.update(self._pids())
        self._pass_on_reloads()

    def keep_subprocess_alive(self) -> None:
        exiting = self.should_exit.is_set()
        super().keep_subprocess_alive()
        if self.should_exit.is_set() and not exiting:
            self.worker_failed_to_start = True
        self._forget_departed()
        self._pass_on_reloads()

    def _pids(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    def _forget_departed(self) -> None:
        current = self._pids()
        for pid in self._known - current:
            forget_worker(self._metrics_directory, pid)
        self._known = current

    def _pass_on_reloads(self) -> None:
        self._reload_due &= self._pids()  # a worker started since loaded the file itself
        for process in self.processes:
            pid = process.pid
            if pid in self._reload_due and process.is_ready(timeout=READY_PROBE_S):
                assert pid is not None
                with contextlib.suppress(ProcessLookupError):  # it died just now: its replacement loads the file
                    os.kill(pid, signal.SIGHUP)
                self._reload_due.discard(pid)


@contextlib.contextmanager
def _shared_metrics_directory() -> Iterator[str]:
    """A new, empty directory only this user can read (0700), for the workers' metrics files; removed at exit.
    A directory of its own per run: no file of an earlier run (or of another server) can be summed in."""
    try:
        directory = tempfile.mkdtemp(prefix="stampd-metrics-")
    except OSError as e:
        raise StampdError(
            f"cannot make the workers' metrics directory in {tempfile.gettempdir()} ({e.strerror}): set TMPDIR"
        ) from None
    previous = os.environ.get(SHARED_DIRECTORY_ENV)
    os.environ[SHARED_DIRECTORY_ENV] = directory  # inherited by every worker process started from now on
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(SHARED_DIRECTORY_ENV, None)
        else:
            os.environ[SHARED_DIRECTORY_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def tls_options(tls: TlsConfig | None) -> dict[str, Any]:
    """uvicorn's TLS settings: HTTPS with the server certificate; with a client CA, a client certificate is
    requested and verified when sent (CERT_OPTIONAL: callers identified by address or token still connect).

    The files are loaded once here, so that a bad one stops start-up with an error naming its field.
    """
    if tls is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(tls.certificate),
        "ssl_keyfile": str(tls.key),
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,  # TLS 1.2 at least (Python's minimum for it), TLS 1.3 preferred
        "ssl_ciphers": TLS12_CIPHERS,
    }
    password = None
    if tls.key_passphrase_file is not None:
        try:
            password = tls.key_passphrase_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(
                f"server.tls_key_passphrase_file: cannot read {tls.key_passphrase_file}: {e.strerror}"
            ) from None
        options["ssl_keyfile_password"] = password
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.certificate, tls.key, password or "")  # never a prompt on the terminal
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"server.tls_certificate, server.tls_key: cannot load {tls.certificate}: {e}") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"server.tls_client_ca: cannot load {tls.client_ca}: {e}") from None
        options["ssl_ca_certs"] = str(tls.client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_OPTIONAL
    return options


@contextlib.contextmanager
def _drained_sigterm_exits_cleanly() -> Iterator[None]:
    """uvicorn drains the connections on SIGTERM, then raises the signal again under the handler it found: with
    the default one the process would die of it after a clean stop. A handler that ignores it makes a drained
    stop exit with status 0, which is what systemd and Kubernetes expect of a service that stopped as asked."""
    previous = signal.signal(signal.SIGTERM, lambda _signal, _frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
