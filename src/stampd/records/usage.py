"""Usage counting in the records database (SQLite or PostgreSQL), exact across processes and nodes, and the usage
report for billing (issue 6: quotas and rate limits).

Reservations are group-committed, as token records are (:mod:`stampd.records.store`): those that arrive together
share ONE transaction, and each caller gets its answer only after that transaction has committed. Inside it, each
reservation increments every counter the subscriber is limited by (its quota windows, then the current second of
its rate) with ``INSERT ... ON CONFLICT DO UPDATE SET count = count + 1 WHERE count < limit RETURNING count``. A full
counter returns no row; that reservation then decrements the counters it incremented itself, and the others in the
batch go on. The transaction holds every counter it touched until it commits (SQLite: the write lock, taken by
``BEGIN IMMEDIATE``; PostgreSQL: the row locks, and ``ON CONFLICT`` re-evaluates the WHERE on the latest committed
version), so no other transaction ever sees an increment that is undone, and under any concurrency no counter
passes its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Engine, bindparam, event, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from stampd.access import Period, Quota, Reservation, Subscriber, usage_limits
from stampd.access import over_limit as _over_limit
from stampd.errors import RecordingError
from stampd.records.engine import open_engine
from stampd.records.maintenance import open_at_head
from stampd.records.schema import tokens, usage_counters

if TYPE_CHECKING:
    from stampd.records.redis_usage import RedisUsageLedger

LEDGER_BUSY_TIMEOUT_MS = 5000
"""How long a SQLite transaction of the ledger waits for another process's write lock. It waits in a ledger
thread, never on the event loop, so it can be longer than the token store's."""

PURGE_EVERY_S = 60
"""Expired counters are deleted about this often: rate counters (one row per subscriber per second) older than a
few seconds, and hour, day and month counters whose window ended at least one whole window ago."""

MAX_BATCH = 512
"""Reservations and releases per transaction at most (as many as the token store commits at once)."""

_US_PER_HOUR = 3600 * 1_000_000
_US_PER_DAY = 24 * _US_PER_HOUR


def expired_before(now_us: int) -> dict[str, str]:
    """Per calendar period (hour, day, month), the key of the window before the current one: every window whose key
    sorts below it ended at least one whole window before ``now_us`` (an hour window more than 2 hours ago)."""
    hour_start = now_us - now_us % _US_PER_HOUR
    day_start = now_us - now_us % _US_PER_DAY
    month_start = int(datetime.fromtimestamp(day_start // 1_000_000, UTC).replace(day=1).timestamp()) * 1_000_000
    starts: dict[Period, int] = {"hour": hour_start, "day": day_start, "month": month_start}
    return {period: Quota(1, period).window(start - 1)[0] for period, start in starts.items()}


def serialise_sqlite_writers(engine: Engine) -> None:
    """Make every SQLite transaction of ``engine`` start with ``BEGIN IMMEDIATE``: it takes the write lock before
    its first read, so a read-then-write transaction cannot interleave with another writer (Python's sqlite3
    otherwise begins lazily, at the first write). No effect on PostgreSQL."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _manual_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 issues no BEGIN of its own
        dbapi_connection.execute(f"PRAGMA busy_timeout={LEDGER_BUSY_TIMEOUT_MS}")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sync_normal(engine: Engine) -> None:
    """Commit the ledger's SQLite transactions without an fsync of their own (WAL with ``synchronous=NORMAL``).

    Why this loses nothing that matters: a committed reservation survives a crash of the process (it is in the
    WAL file, in the page cache); only a power cut or kernel crash can take back the reservations of the last
    moments. Those are never the reservations of an issued token: its reservation committed to the same WAL file
    before the token was signed, and the token's own record commits there with ``synchronous=FULL`` (the token
    store's connection), whose fsync of the WAL also makes every earlier frame durable. What a power cut can lose
    is therefore only the increments of requests that never got their token, and releases (the subscriber is
    charged for a refused request: never more than the quota). Billing counts the tokens themselves
    (:func:`usage_report`). Exactness under concurrency does not depend on this at all (that is the write lock)."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _normal(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


class _Statement:
    """One statement compiled once for the engine's dialect, run through the DB-API cursor (no SQLAlchemy on the
    hot path), as the token store does."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = str(compiled)
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._defaults = dict(compiled.params)

    def params(self, **values: Any) -> Any:
        params = {**self._defaults, **values}
        return params if self._order is None else tuple(params[name] for name in self._order)


@dataclass(slots=True)
class _Operation:
    """A reservation (``limits`` given: windows and their limits, in :func:`usage_limits` order) or a release
    (``limits`` None) waiting for its batch; ``done`` receives the index of the first full counter (None: fits)."""

    subscriber: str
    windows: tuple[str, ...]
    limits: tuple[int, ...] | None
    done: asyncio.Future[int | None] = field(repr=False)

    @property
    def lock_order(self) -> tuple[str, tuple[str, ...]]:
        """Batches touch counters sorted by subscriber, then window in :func:`usage_limits` order, so two batches
        on PostgreSQL lock the rows they share in the same order and cannot deadlock (except across a window
        boundary, when PostgreSQL aborts one: its callers get an error, and nothing of it is counted)."""
        return self.subscriber, self.windows


class SqlUsageLedger:
    """The :class:`~stampd.access.UsageLedger` on the records database (``[access] ledger = "records"``).

    Blocking database calls run in the ledger's own threads, never on the event loop: one batch at a time on
    SQLite (it has one writer anyway), up to ``threads`` batches at once on PostgreSQL, each on a connection of
    its own."""

    def __init__(self, url_or_engine: str | Engine, *, threads: int = 2) -> None:
        try:
            self._engine = open_engine(url_or_engine, create=False) if isinstance(url_or_engine, str) else url_or_engine
        except (SQLAlchemyError, ImportError, OSError) as e:
            raise RecordingError(f"cannot open the usage ledger: {e}") from e
        serialise_sqlite_writers(self._engine)
        _sync_normal(self._engine)
        on_postgresql = self._engine.dialect.name == "postgresql"
        self._begin = None if on_postgresql else "BEGIN IMMEDIATE"  # psycopg begins implicitly
        self._increment, self._decrement = self._statements(postgresql.insert if on_postgresql else sqlite.insert)
        self._max_in_flight = max(1, threads) if on_postgresql else 1
        self._executor = ThreadPoolExecutor(max_workers=self._max_in_flight, thread_name_prefix="stampd-usage")
        self._pending: list[_Operation] = []
        self._in_flight: set[asyncio.Future[list[int | None]]] = set()
        self._flush_scheduled = False
        self._next_purge_s = 0
        self.transactions = 0
        """Batches committed so far (diagnostics: it shows how well reservations are grouped)."""

    def _statements(self, insert: Callable[..., Any]) -> tuple[_Statement, _Statement]:
        table, dialect = usage_counters, self._engine.dialect
        increment = (
            insert(table)
            .values(subscriber=bindparam("subscriber"), window=bindparam("window"), count=1)
            .on_conflict_do_update(
                index_elements=[table.c.subscriber, table.c.window],
                set_={"count": table.c.count + 1},
                where=table.c.count < bindparam("limit"),
            )
            .returning(table.c.count)
        )
        decrement = (
            update(table)
            .where(table.c.subscriber == bindparam("who"), table.c.window == bindparam("which"), table.c.count > 0)
            .values(count=table.c.count - 1)
        )
        return _Statement(increment, dialect), _Statement(decrement, dialect)

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        limits = usage_limits(subscriber, now_us)
        if not limits:
            return Reservation(subscriber.name)
        windows = tuple(w.window for w in limits)
        full = await self._submit(subscriber.name, windows, tuple(w.limit for w in limits))
        if full is not None:
            raise _over_limit(subscriber, limits[full], now_us)
        self._maybe_purge(now_us)
        return Reservation(subscriber.name, windows)

    async def release(self, reservation: Reservation) -> None:
        if reservation.windows:
            await self._submit(reservation.subscriber, reservation.windows, None)

    # --- group commit ---

    def _submit(self, subscriber: str, windows: tuple[str, ...], limits: tuple[int, ...] | None) -> Any:
        """Queue one operation for the next batch; the future of its outcome."""
        loop = asyncio.get_running_loop()
        operation = _Operation(subscriber, windows, limits, loop.create_future())
        self._pending.append(operation)
        if not self._flush_scheduled and len(self._in_flight) < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the other requests ready in this iteration have queued theirs
        return operation.done

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and len(self._in_flight) < self._max_in_flight:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            batch.sort(key=lambda operation: operation.lock_order)
            running = asyncio.wrap_future(self._executor.submit(self._apply, batch))
            self._in_flight.add(running)
            running.add_done_callback(functools.partial(self._settle, batch))

    def _settle(self, batch: list[_Operation], done: asyncio.Future[list[int | None]]) -> None:
        """Answer every caller of a finished batch (on the event loop), then start the next batch."""
        self._in_flight.discard(done)
        error = done.exception()
        if error is None:
            for operation, outcome in zip(batch, done.result(), strict=True):
                if not operation.done.done():
                    operation.done.set_result(outcome)
        else:
            for operation in batch:
                if not operation.done.done():
                    what = "reserve" if operation.limits is not None else "release a reservation"
                    operation.done.set_exception(RecordingError(f"the usage ledger failed to {what}: {error}"))
        if self._pending:
            self._flush()

    def _apply(self, batch: list[_Operation]) -> list[int | None]:
        """Run a batch in one transaction (in a ledger thread): per operation, the index of its first full counter,
        None when it fitted (a release always fits). Any failure rolls back the whole batch and raises."""
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            if self._begin is not None:
                cursor.execute(self._begin)
            outcomes = [self._apply_one(cursor, operation) for operation in batch]
            cursor.close()
            self._commit(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.rollback()
            connection.invalidate()  # a broken connection (database restart, failover) is not reused
            raise
        finally:
            connection.close()
        self.transactions += 1
        return outcomes

    @staticmethod
    def _commit(connection: Any) -> None:
        connection.commit()

    def _apply_one(self, cursor: Any, operation: _Operation) -> int | None:
        who, decrement = operation.subscriber, self._decrement
        if operation.limits is None:
            for window in operation.windows:
                cursor.execute(decrement.sql, decrement.params(who=who, which=window))
            return None
        increment = self._increment
        for index, (window, limit) in enumerate(zip(operation.windows, operation.limits, strict=True)):
            cursor.execute(increment.sql, increment.params(subscriber=who, window=window, limit=limit))
            if cursor.fetchone() is None:  # full: undo this reservation's own increments, nobody else's
                for taken in operation.windows[:index]:
                    cursor.execute(decrement.sql, decrement.params(who=who, which=taken))
                return index
        return None

    # --- housekeeping ---

    def _maybe_purge(self, now_us: int) -> None:
        now_s = now_us // 1_000_000
        if now_s < self._next_purge_s:
            return
        self._next_purge_s = now_s + PURGE_EVERY_S
        self._executor.submit(self._purge, now_us)

    def _purge(self, now_us: int) -> int:
        """Delete the counters that can never be incremented or released again: rate counters of seconds more than
        two seconds ago, and each calendar window before the previous one (a release may still come for a window
        that has just ended). ``total`` is never deleted. Windows compare as text: their keys are zero-padded, so
        text order is time order (epoch seconds while they have 10 digits, until 2286)."""
        table = usage_counters
        expired = [table.c.window.like("s:%") & (table.c.window < f"s:{now_us // 1_000_000 - 2}")]
        expired += [
            table.c.window.like(f"{period}:%") & (table.c.window < first_kept)
            for period, first_kept in expired_before(now_us).items()
        ]
        try:
            with self._engine.begin() as conn:
                return int(conn.execute(table.delete().where(or_(*expired))).rowcount)
        except SQLAlchemyError:
            return 0  # counting goes on; the next purge tries again

    def counts(self, subscriber: str) -> dict[str, int]:
        """The counters of ``subscriber``, by window (for `stampd subscribers show` and the tests)."""
        query = select(usage_counters.c.window, usage_counters.c.count).where(usage_counters.c.subscriber == subscriber)
        with self._engine.connect() as conn:
            return {str(window): int(count) for window, count in conn.execute(query)}

    async def close(self) -> None:
        """Finish the batches in flight and the operations still queued, then close."""
        while self._in_flight or self._pending:
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
            elif self._pending:
                self._flush()
        self._executor.shutdown(wait=True)
        self._engine.dispose()


def open_usage_ledger(spec: str, records_url: str) -> SqlUsageLedger | RedisUsageLedger:
    """The ledger ``[access] ledger`` names: ``records`` (the records database at ``records_url``) or a Redis URL
    (``redis://``, ``rediss://``, ``unix://``)."""
    if spec == "records":
        return SqlUsageLedger(records_url)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from stampd.records.redis_usage import RedisUsageLedger  # noqa: PLC0415  (redis only when configured)

        return RedisUsageLedger(spec)
    raise ValueError(f"unknown usage ledger {spec!r}: expected 'records' or a redis:// URL")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Granted tokens of one subscriber on one TSU in the report's period."""

    subscriber: str
    tsu: str
    tokens: int
    first_us: int
    last_us: int


def usage_report(url: str, from_us: int, to_us: int, subscriber: str | None = None) -> list[UsageRow]:
    """Tokens granted to subscribers with genTime in [from, to), by subscriber and TSU: read from the tokens
    themselves, so the report counts exactly what was issued (a reservation that was released is not there)."""
    t = tokens
    query = (
        select(t.c.subscriber, t.c.tsu, func.count(), func.min(t.c.gen_time_us), func.max(t.c.gen_time_us))
        .where(t.c.subscriber.is_not(None), t.c.gen_time_us >= from_us, t.c.gen_time_us < to_us)
        .group_by(t.c.subscriber, t.c.tsu)
        .order_by(t.c.subscriber, t.c.tsu)
    )
    if subscriber is not None:
        query = query.where(t.c.subscriber == subscriber)
    engine = open_at_head(url, "the usage report")
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot read the usage from the records: {e}") from e
    finally:
        engine.dispose()
    return [UsageRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4])) for r in rows]
