"""SQL record store with group commit: concurrent requests share one transaction, and each request is answered
only after the transaction holding its record has committed (RFC 3628 §7.4.8; SPEC OPS-09)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, create_engine, event, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from stampd.errors import RecordingError
from stampd.model import TokenRecord
from stampd.records.schema import events, metadata, tokens

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Records per transaction at most: enough to amortise a commit, small enough to keep latency flat."""

_STOP = object()
_Pending = tuple[dict[str, Any], "asyncio.Future[None]"]


def serial_key(serial: int) -> str:
    return format(serial, "x")


def _row(record: TokenRecord) -> dict[str, Any]:
    return {
        "serial": serial_key(record.serial),
        "gen_time": record.gen_time,
        "gen_time_us": record.gen_time_ns // 1000,
        "tsu": record.tsu,
        "policy": record.policy,
        "hash_oid": record.hash_oid,
        "imprint": record.imprint,
        "nonce": None if record.nonce is None else str(record.nonce),
        "requester": record.requester,
        "token": record.token,
    }


def _record(row: Any) -> TokenRecord:
    return TokenRecord(
        serial=int(row.serial, 16),
        gen_time_ns=row.gen_time_us * 1000,
        gen_time=row.gen_time,
        tsu=row.tsu,
        policy=row.policy,
        hash_oid=row.hash_oid,
        imprint=row.imprint,
        nonce=None if row.nonce is None else int(row.nonce),
        token=row.token,
        requester=row.requester,
    )


def _configure_sqlite(engine: Engine) -> None:
    """WAL with a full sync at every commit: a committed record survives power loss; readers never block."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()


class RecordStore:
    """Tokens and events in one SQL database (SQLite by default)."""

    def __init__(self, url: str) -> None:
        try:
            self._engine = create_engine(url)
            if self._engine.dialect.name == "sqlite":
                _configure_sqlite(self._engine)
            metadata.create_all(self._engine)
        except SQLAlchemyError as e:
            raise RecordingError(f"cannot open the records at {url}: {e}") from e
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    # --- issuance path ---

    async def record(self, record: TokenRecord) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_batches, name="stampd-records", daemon=True)
            self._writer.start()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((_row(record), future))
        await future

    def _write_batches(self) -> None:
        with self._engine.connect() as conn:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is _STOP:
                    break
                batch: list[_Pending] = [first]  # type: ignore[list-item]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                outcomes = self._commit(conn, [row for row, _ in batch])
                _settle_threadsafe([f for _, f in batch], outcomes)

    def _commit(self, conn: Connection, rows: list[dict[str, Any]]) -> list[RecordingError | None]:
        try:
            with conn.begin():
                conn.execute(insert(tokens), rows)
            return [None] * len(rows)
        except IntegrityError:
            return [self._commit_one(conn, row) for row in rows]
        except Exception as e:  # any failure must answer the waiting requests, never strand them
            log.error("records: a batch of %d tokens could not be committed: %s", len(rows), e)
            return [RecordingError("the records store failed")] * len(rows)

    def _commit_one(self, conn: Connection, row: dict[str, Any]) -> RecordingError | None:
        try:
            with conn.begin():
                conn.execute(insert(tokens), [row])
        except SQLAlchemyError as e:
            log.error("records: token %s could not be committed: %s", row["serial"], e)
            return RecordingError("the records store failed")
        return None

    # --- events and reads ---

    def record_event(self, kind: str, detail: dict[str, Any], tsu: str | None = None) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(events),
                    [{"at_us": time.time_ns() // 1000, "kind": kind, "tsu": tsu, "detail": json.dumps(detail)}],
                )
        except SQLAlchemyError as e:
            raise RecordingError(f"cannot record the {kind} event: {e}") from e

    def events(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(events).order_by(events.c.id)).all()
        return [
            {"at_us": r.at_us, "kind": r.kind, "tsu": r.tsu, "detail": json.loads(r.detail)} for r in rows
        ]

    def token_by_serial(self, serial: int) -> TokenRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.serial == serial_key(serial))).first()
        return None if row is None else _record(row)

    def tokens_by_imprint(self, imprint: bytes) -> list[TokenRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(tokens).where(tokens.c.imprint == imprint).order_by(tokens.c.gen_time_us)
            ).all()
        return [_record(r) for r in rows]

    def close(self) -> None:
        """Finish every pending write, then release the database."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._engine.dispose()


def _settle_threadsafe(futures: list[asyncio.Future[None]], outcomes: list[RecordingError | None]) -> None:
    """Wake the waiting requests with one call per event loop (one loop per worker process in practice)."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list[asyncio.Future[None]], list[RecordingError | None]]] = {}
    for future, outcome in zip(futures, outcomes, strict=True):
        waiting, results = by_loop.setdefault(future.get_loop(), ([], []))
        waiting.append(future)
        results.append(outcome)
    for loop, (waiting, results) in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, waiting, results)


def _settle(futures: Iterable[asyncio.Future[None]], outcomes: Iterable[RecordingError | None]) -> None:
    for future, error in zip(futures, outcomes, strict=True):
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
