"""Run the ASGI application under uvicorn, in one or several worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from stampd.config import CONFIG_ENV, Config, TlsConfig
from stampd.errors import ConfigError
from stampd.logs import log_config
from stampd.server.asgi import TimeStampApp
from stampd.server.protocol import TimeStampHttpProtocol

FACTORY = "stampd.app:create_app_from_environment"

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
    worker process builds its own from the same file (its own record writer included).
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
    uvicorn.run(FACTORY, factory=True, workers=workers, **options)


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
