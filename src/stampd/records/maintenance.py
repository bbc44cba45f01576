"""What the records' maintenance commands share (`stampd audit verify`, `stampd records purge|export`): opening the
records at the schema head, the two chained tables (their time column and entry hash), and a report of problems.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from stampd.errors import RecordingError
from stampd.records.chain import event_entry_hash, token_entry_hash
from stampd.records.engine import mask_url, open_engine
from stampd.records.migrate import current_revision, head_revision
from stampd.records.schema import events, tokens

STREAM_ROWS = 2000
"""Rows fetched at a time while reading a whole table: memory does not grow with the records."""

CHAINED_TABLES: dict[str, Table] = {"tokens": tokens, "events": events}
TIME_COLUMN = {"tokens": "gen_time_us", "events": "at_us"}
"""The column a row's age is read from: genTime for a token, the time it was recorded for an event."""
ENTRY_HASHERS: dict[str, Callable[[bytes, str, int, Mapping[str, Any]], bytes]] = {
    "tokens": token_entry_hash,
    "events": event_entry_hash,
}


def open_at_head(url: str, needs: str) -> Engine:
    """An unpooled engine on the records at ``url``, refused (RecordingError) unless the schema is at the head
    revision: ``needs`` names the command in the message ("the audit", "purging")."""
    revision = current_revision(url)
    if revision != head_revision():
        raise RecordingError(
            f"the records schema is at {revision or 'empty'}, {needs} needs {head_revision()}: run `stampd db upgrade`"
        )
    try:
        return open_engine(url, create=False, pooled=False)
    except (SQLAlchemyError, ImportError, OSError) as e:
        raise RecordingError(f"cannot open the records at {mask_url(url)}: {e}") from e


def row_fields(row: Any) -> dict[str, Any]:
    """A row as the hash functions read it: binary columns as bytes (some drivers give memoryviews)."""
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row._mapping.items()}


@dataclass(slots=True)
class Findings:
    """A check's report: good when it found no problem. ``as_dict`` is what `--json` prints."""

    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **self.details(), "problems": self.problems}

    def details(self) -> dict[str, Any]:
        """What the check counted, between ``ok`` and ``problems``."""
        return {}
