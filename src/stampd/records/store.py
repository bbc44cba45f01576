"""SQL record store with group commit: the requests of one event-loop iteration share one transaction, and each
is answered only after the transaction holding its record has committed (RFC 3628 §7.4.8; SPEC OPS-09)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, false, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from stampd.errors import RecordingError
from stampd.metrics import RECORD_BATCH_SIZE, RECORD_COMMIT_SECONDS
from stampd.model import TokenRecord
from stampd.records.chain import ChainHead, event_entry_hash, new_chain_id, token_entry_hash
from stampd.records.checkpoint import Checkpoint, CheckpointSigner, Heads, heads_json, signed_bytes
from stampd.records.engine import mask_url, open_engine, sqlite_file
from stampd.records.migrate import current_revision, head_revision
from stampd.records.schema import checkpoints, events, tokens, tsu_states

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Records per transaction at most: enough to amortise a commit, small enough to keep latency flat."""

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
        "subscriber": record.subscriber,
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
        subscriber=row.subscriber,
    )


@dataclass(frozen=True, slots=True)
class TsuState:
    tsu: str
    state: str
    since_us: int | None
    at_us: int
    reason: str | None


class RecordStore:
    """Tokens and events in one SQL database: SQLite (the embedded default) or PostgreSQL (psycopg 3).

    Each instance appends to hash chains of its own (one of tokens, one of events, under one chain id made at
    open, see :mod:`stampd.records.chain`): a chain's head advances only when a row has committed, so the chains
    need no coordination between processes or nodes.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open the records at ``url``; with ``create`` false (the read-only commands) a missing SQLite database
        is an error rather than a new empty one. The schema is not created here: `stampd db upgrade` (or
        :func:`stampd.records.migrate.upgrade`) does, and :meth:`check_schema` says whether it is the one expected."""
        self._url = url
        try:
            self._engine = open_engine(url, create=create)
            database = sqlite_file(self._engine)
            self._sqlite_file = (database, os.stat(database).st_ino) if database is not None else None
        except (SQLAlchemyError, ImportError, OSError) as e:
            raise RecordingError(f"cannot open the records at {self._shown_url}: {e}") from e
        # The hot path bypasses SQLAlchemy: one INSERT compiled once for this dialect, run through DB-API
        # executemany (sqlite3: qmark, positional; psycopg: pyformat, named).
        statement = insert(tokens).compile(dialect=self._engine.dialect)
        self._insert_sql = str(statement)
        self._insert_order = tuple(statement.positiontup or ()) if statement.positional else None
        self._connection: Any = None
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._in_flight: tuple[Future[None], list[_Pending], int, bytes, float] | None = None
        self.write_error: str | None = None
        """Why the last write (a batch of token records, or :meth:`probe_writable`) failed; None when it worked."""
        self.last_write_at = time.monotonic()
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stampd-commit")
        self.chain_id = new_chain_id()
        self._token_head = ChainHead(self.chain_id)
        self._event_head = ChainHead(self.chain_id)
        self._event_lock = threading.Lock()  # events may come from any thread; tokens only from the loop
        self._checkpointed: Heads | None = None

    @property
    def _shown_url(self) -> str:
        return mask_url(self._url)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

    def check_schema(self, config_file: str | os.PathLike[str] = "FILE") -> None:
        """Refuse a database whose schema revision is not the one this stampd was written for: older (or empty)
        needs `stampd db upgrade`; newer or unknown needs this stampd upgraded."""
        expected = head_revision()
        actual = current_revision(self._url)
        if actual != expected:
            shown = "empty (no records schema)" if actual is None else actual
            raise RecordingError(
                f"the records schema is at {shown}, this stampd needs {expected}: "
                f"run `stampd db upgrade -c {config_file}`"
            )

    # --- issuance path ---

    async def record(self, record: TokenRecord) -> None:
        """Wait until ``record`` is committed together with the other records of its batch.

        Group commit, pipelined: the rows of a batch are chained and inserted on the event loop (no GIL
        contention per row), and only the COMMIT, which waits for the disk or the database server, runs in the
        commit thread; meanwhile the loop signs the next requests, whose records form the next batch. One batch
        is in flight at a time, so the chain and the connection are never used by two batches at once.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((_row(record), future))
        if not self._flush_scheduled and self._in_flight is None:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight is not None or not self._pending:
            return
        started = time.perf_counter()
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        rows = [row for row, _ in batch]
        try:
            params, seq, entry = self._chained(rows)
            connection = self._execute_inserts(params)
        except Exception:
            self._rolled_back()
            self._settle(batch, self._commit(rows))
            self._flush()
            return
        commit: Future[None] = self._committer.submit(connection.commit)
        self._in_flight = (commit, batch, seq, entry, started)
        asyncio.wrap_future(commit).add_done_callback(self._committed)

    def _committed(self, _done: object) -> None:
        self._finish_commit()
        self._flush()

    def _finish_commit(self) -> None:
        """Settle the batch whose COMMIT has returned (once, whoever gets here first: the loop or close())."""
        if self._in_flight is None:
            return
        commit, batch, seq, entry, started = self._in_flight
        self._in_flight = None
        if commit.exception() is None:
            self._token_head.advance(seq, entry)
            RECORD_COMMIT_SECONDS.observe(time.perf_counter() - started)
            RECORD_BATCH_SIZE.observe(len(batch))
            self._wrote(None)
            self._settle(batch, [None] * len(batch))
        else:
            self._rolled_back()
            self._settle(batch, self._commit([row for row, _ in batch]))

    def _rolled_back(self) -> None:
        """After a failed batch: no transaction left open, and the chain head as the database has it."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.rollback()
        self._discard_connection()
        self._resync_head(tokens, self._token_head)

    @staticmethod
    def _settle(batch: list[_Pending], outcomes: list[RecordingError | None]) -> None:
        for (_, future), error in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _chained(self, rows: list[dict[str, Any]]) -> tuple[list[Any], int, bytes]:
        """The insert parameters of ``rows`` as the next entries of the token chain, in order; with the seq and
        entry hash the head moves to once they have committed."""
        head = self._token_head
        chain, seq, prev = head.chain, head.seq, head.entry_hash
        for row in rows:
            seq += 1
            entry = token_entry_hash(prev, chain, seq, row)
            row["chain"] = chain
            row["seq"] = seq
            row["prev_hash"] = prev
            row["entry_hash"] = entry
            prev = entry
        order = self._insert_order
        params = [tuple(row[k] for k in order) for row in rows] if order is not None else rows
        return params, seq, prev

    def _commit(self, rows: list[dict[str, Any]]) -> list[RecordingError | None]:
        """Insert a batch in one transaction; if that fails, row by row, so that one bad row (a duplicate
        serial) fails only its own request. Each attempt chains its rows from the head as it is then, and the
        head advances only on success: a failed row leaves no gap."""
        try:
            params, seq, entry = self._chained(rows)
            self._insert(params)
            self._token_head.advance(seq, entry)
            self._wrote(None)
            return [None] * len(rows)
        except Exception as e:  # any failure must answer the waiting requests, never strand them
            if not isinstance(e, self._engine.dialect.loaded_dbapi.IntegrityError):  # a refused row is no outage
                self._wrote(_first_line(e))
            self._discard_connection()  # a lost connection (database restart, failover) is replaced next time
            self._resync_head(tokens, self._token_head)
            if len(rows) == 1:
                log.error("records: a token could not be committed: %s", e)
                return [RecordingError("the records store failed")]
        return [self._commit([row])[0] for row in rows]

    def _resync_head(self, table: Any, head: ChainHead) -> None:
        """After a failure, take the head from the database: a commit whose outcome was lost (the connection
        broke after COMMIT) must not leave the chain stuck on a seq that is already taken."""
        query = (
            select(table.c.seq, table.c.entry_hash)
            .where(table.c.chain == head.chain)
            .order_by(table.c.seq.desc())
            .limit(1)
        )
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query).first()
        except Exception:  # the database is still away: the next attempt fails too, and resyncs again
            return
        if row is not None and row.seq > head.seq:
            log.warning("records: the %s chain head moved to seq %d after a lost commit", table.name, row.seq)
            head.advance(int(row.seq), bytes(row.entry_hash))

    def _execute_inserts(self, params: list[Any]) -> Any:
        """Run the token INSERTs on the raw DB-API connection (opened if need be) and return it, uncommitted."""
        self._check_sqlite_file()
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        cursor = self._connection.cursor()
        try:
            cursor.executemany(self._insert_sql, params)
        finally:
            cursor.close()
        return self._connection

    def _insert(self, params: list[Any]) -> None:
        """One transaction of token inserts on the raw DB-API connection."""
        try:
            self._execute_inserts(params).commit()
        except BaseException:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.rollback()
            raise

    def _discard_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def _check_sqlite_file(self) -> None:
        """SQLite writes on into a database file that was deleted or replaced: its records would be lost, so a
        token must not be granted on them."""
        if self._sqlite_file is None:
            return
        path, inode = self._sqlite_file
        try:
            same = os.stat(path).st_ino == inode
        except OSError:
            same = False
        if not same:
            raise RecordingError(f"the records database {path} was removed or replaced")

    # --- events and reads ---

    def _chain_event(self, row: dict[str, Any]) -> tuple[int, bytes]:
        """Give ``row`` the next place in the event chain (the caller holds the event lock); the head moves
        there once the row has committed."""
        head = self._event_head
        seq = head.seq + 1
        entry = event_entry_hash(head.entry_hash, head.chain, seq, row)
        row.update(chain=head.chain, seq=seq, prev_hash=head.entry_hash, entry_hash=entry)
        return seq, entry

    def record_event(self, kind: str, detail: dict[str, Any], tsu: str | None = None) -> None:
        """Append one event, committed before this returns."""
        row = {"at_us": time.time_ns() // 1000, "kind": kind, "tsu": tsu, "detail": json.dumps(detail)}
        with self._event_lock:
            try:
                with self._engine.begin() as conn:
                    seq, entry = self._chain_event(row)
                    conn.execute(insert(events), [row])
            except SQLAlchemyError as e:
                self._resync_head(events, self._event_head)
                raise RecordingError(f"cannot record the {kind} event: {e}") from e
            self._event_head.advance(seq, entry)

    def has_event(self, kind: str, tsu: str | None, **detail: Any) -> bool:
        """Whether an event of ``kind`` for ``tsu`` whose detail holds these values was recorded."""
        query = select(events.c.detail).where(events.c.kind == kind, events.c.tsu == tsu)
        with self._engine.connect() as conn:
            rows = conn.execute(query).scalars().all()
        return any(all(json.loads(row).get(k) == v for k, v in detail.items()) for row in rows)

    def events(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(events).order_by(events.c.id)).all()
        return [{"at_us": r.at_us, "kind": r.kind, "tsu": r.tsu, "detail": json.loads(r.detail)} for r in rows]

    def stop_tsu(self, tsu: str, state: str, *, since_us: int | None, reason: str, detail: dict[str, Any]) -> TsuState:
        """Mark ``tsu`` compromised or terminated and record the event, in one transaction; permanent."""
        if state not in ("compromised", "terminated"):
            raise ValueError(f"unknown TSU state {state!r}")
        stopped = TsuState(tsu, state, since_us, time.time_ns() // 1000, reason)
        row = {"tsu": tsu, "state": state, "since_us": since_us, "at_us": stopped.at_us, "reason": reason}
        with self._event_lock:
            return self._stop_tsu(stopped, row, detail)

    def _stop_tsu(self, stopped: TsuState, row: dict[str, Any], detail: dict[str, Any]) -> TsuState:
        tsu, state = stopped.tsu, stopped.state
        try:
            with self._engine.begin() as conn:
                if self.dialect == "postgresql":
                    # Wait for the token transactions in flight and hold back new ones until this commits: a
                    # token whose record committed after this state would otherwise have slipped past the
                    # trigger on a snapshot taken before it (SQLite serialises writers, so needs nothing).
                    conn.exec_driver_sql("LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE")
                conn.execute(delete(tsu_states).where(tsu_states.c.tsu == tsu))
                conn.execute(insert(tsu_states), [row])
                event = {"at_us": stopped.at_us, "kind": f"tsu.{state}", "tsu": tsu, "detail": json.dumps(detail)}
                seq, entry = self._chain_event(event)
                conn.execute(insert(events), [event])
        except SQLAlchemyError as e:
            self._resync_head(events, self._event_head)
            raise RecordingError(f"cannot record that TSU {tsu} is {state}: {e}") from e
        self._event_head.advance(seq, entry)
        return stopped

    # --- checkpoints ---

    def heads(self) -> Heads:
        """The committed heads of this store's chains: table -> chain id -> [seq, entry_hash hex]."""
        with self._event_lock:
            events_head = self._event_head.as_json()
        return {"events": {self.chain_id: events_head}, "tokens": {self.chain_id: self._token_head.as_json()}}

    def write_checkpoint(self, signer: CheckpointSigner) -> Checkpoint | None:
        """Sign the heads of this store's chains and store the checkpoint; None when nothing was recorded since
        the last one. Runs on the event loop (as the token commits do), after committing what is pending."""
        if self._pending:
            self._flush()
        heads = self.heads()
        if heads == self._checkpointed:
            return None
        at_us = time.time_ns() // 1000
        signature = signer.sign(signed_bytes(at_us, heads))
        text = heads_json(heads)
        row = {"at_us": at_us, "heads": text, "signature": signature, "signer": signer.key_id}
        try:
            with self._engine.begin() as conn:
                key = conn.execute(insert(checkpoints).returning(checkpoints.c.id), [row]).scalar_one()
        except SQLAlchemyError as e:
            raise RecordingError(f"cannot record a checkpoint: {e}") from e
        self._checkpointed = heads
        return Checkpoint(int(key), at_us, text, signature, signer.key_id)

    def tsu_states(self) -> dict[str, TsuState]:
        """Every TSU that is not active, by name."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(tsu_states)).all()
        return {r.tsu: TsuState(r.tsu, r.state, r.since_us, r.at_us, r.reason) for r in rows}

    def tokens_between(self, tsu: str, since_us: int, until_us: int | None = None) -> list[TokenRecord]:
        """Tokens of ``tsu`` with genTime in [since, until], oldest first (the compromise report, SPEC OPS-10)."""
        query = select(tokens).where(tokens.c.tsu == tsu, tokens.c.gen_time_us >= since_us)
        if until_us is not None:
            query = query.where(tokens.c.gen_time_us <= until_us)
        with self._engine.connect() as conn:
            rows = conn.execute(query.order_by(tokens.c.gen_time_us)).all()
        return [_record(r) for r in rows]

    def last_gen_time_ns(self) -> int:
        """The latest genTime recorded, so that genTime never goes backwards across restarts (issue: clock)."""
        with self._engine.connect() as conn:
            latest = conn.execute(select(func.max(tokens.c.gen_time_us))).scalar()
        return 0 if latest is None else int(latest) * 1000

    def token_by_serial(self, serial: int) -> TokenRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.serial == serial_key(serial))).first()
        return None if row is None else _record(row)

    def tokens_by_imprint(self, imprint: bytes) -> list[TokenRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(tokens).where(tokens.c.imprint == imprint).order_by(tokens.c.gen_time_us)).all()
        return [_record(r) for r in rows]

    def close(self) -> None:
        """Commit what is pending, then release the database."""
        if self._in_flight is not None:
            self._in_flight[0].exception()  # waits for the COMMIT in flight
            self._finish_commit()
        if self._pending:
            rows = [row for row, _ in self._pending]
            self._settle(self._pending, self._commit(rows))
            self._pending = []
        self._committer.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._engine.dispose()

    # --- readiness ---

    def _wrote(self, error: str | None) -> None:
        self.write_error = error
        self.last_write_at = time.monotonic()

    def probe_writable(self) -> str | None:
        """Open a write transaction that changes nothing and roll it back: what /readyz relies on when no token
        was committed lately (a read-only database or standby, a lost server, a removed SQLite file). Blocking:
        call it in a thread. Returns the error (also kept in :attr:`write_error`), None when writable."""
        try:
            self._check_sqlite_file()
            with self._engine.connect() as conn:
                transaction = conn.begin()
                try:
                    conn.execute(delete(tsu_states).where(false()))
                finally:
                    transaction.rollback()
        except (SQLAlchemyError, RecordingError) as e:
            self._wrote(_first_line(e))
        else:
            self._wrote(None)
        return self.write_error


def _first_line(error: Exception) -> str:
    """A database error in one line (drivers and SQLAlchemy append the statement and links on further lines)."""
    first, _, _ = str(error).partition("\n")
    return f"{type(error).__name__}: {first}"
