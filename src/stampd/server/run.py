"""Run the ASGI application under uvicorn, in one or several worker processes."""

from __future__ import annotations

import os
from typing import Any

import uvicorn

from stampd.config import CONFIG_ENV, Config
from stampd.server.asgi import TimeStampApp
from stampd.server.protocol import TimeStampHttpProtocol

FACTORY = "stampd.app:create_app_from_environment"

LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {"uvicorn": {"level": "INFO"}, "uvicorn.error": {"level": "INFO"}},
}
"""Applied in the serving process and again in every worker process (uvicorn configures each from it)."""


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
        "timeout_keep_alive": max(1, round(config.server.request_timeout_s)),
        "log_config": LOG_CONFIG,
    }
    if workers == 1:
        uvicorn.Server(uvicorn.Config(app, **options)).run()
        return
    os.environ[CONFIG_ENV] = str(config.source.resolve())
    uvicorn.run(FACTORY, factory=True, workers=workers, **options)
