"""Log context shared by the server and every module that logs while serving a request, and the two log formats
of `stampd serve`: JSON lines for log collectors (the default) and plain text for humans.

Nothing here decides what is logged: request bodies, passphrases, PINs, API tokens and Authorization headers are
never passed to a logger in the first place (tests/unit/test_logs.py serves requests with credentials and reads
the log).
"""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("stampd_request_id", default=None)
"""The id of the HTTP request being served (set by the server per request; None outside a request)."""

LOG_FORMATS = ("json", "text")

_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "color_message", "taskName"}
)
"""LogRecord attributes that are not ``extra`` fields (uvicorn's ``color_message`` repeats the message)."""


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being served (or None) on every record, as ``request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def rfc3339_utc(created: float) -> str:
    """``2026-11-21T10:00:00.123Z``: RFC 3339, UTC, milliseconds."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, request_id (when set), exception (when
    any), and any ``extra`` fields the call passed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process if record.process is not None else os.getpid(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger[pid]: message`` with `` [request ID]`` when a request is being served."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [request {request_id}]{newline}{rest}"


def log_config(log_format: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of `stampd serve` (also handed to uvicorn, which applies it again in
    every worker process): one stderr handler with the request-id filter and the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (known: {', '.join(LOG_FORMATS)})")
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {log_format: {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": log_format,
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {"uvicorn": {"level": "INFO"}, "uvicorn.error": {"level": "INFO"}},
    }
