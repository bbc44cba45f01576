"""Log context shared by the server and every module that logs while serving a request."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("stampd_request_id", default=None)
"""The id of the HTTP request being served (set by the server per request; None outside a request)."""
