"""Retention: `stampd records purge` removes the tokens and events older than ``records.retention`` without
breaking the evidence (issue "Evidence that scales", item 4; RFC 3628 §7.4.11: records kept for the disclosed
period; SPEC OPS-08, OPS-09).

A hash chain can only lose a prefix: deleting entries from its middle would be indistinguishable from tampering.
So each chain (:mod:`stampd.records.chain`) is cut after its last entry ``N`` such that every entry up to ``N`` is
older than the cut-off; an old entry recorded after a younger one is kept (retention is a minimum, never a
maximum). What remains of a cut chain starts at seq ``N + 1``, whose prev_hash is the entry hash of seq ``N``:
that pair is the chain's *anchor*, ``[N, entry_hash hex]``.

A purge is planned first (reading only), then done in *steps*: transactions of at most ``batch_rows`` deleted rows
each, so that on SQLite a serving process's commit never waits long for the write lock (it waits
``engine.BUSY_TIMEOUT_MS`` at most), with a pause between steps in which it gets the lock. Each step is complete in
itself: its deletions, a ``records.purged`` event whose detail holds the cut-off, what the step removed and the
anchors of *every* chain ever cut (carried forward from the earlier purge events, which a purge may itself remove),
and, with a checkpoint key, a checkpoint signing that event and the new heads of the chains it cut. The steps of
one run are seq 1, 2, ... of one events chain of their own. A purge stopped between steps (a crash, a lost
connection) leaves records that `stampd audit verify` accepts; the next purge goes on from there. The audit lets a
chain start after seq 1 only at such an anchor, and (with a checkpoint key) only when a verified checkpoint covers
the event that recorded it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from stampd.errors import RecordingError
from stampd.records.chain import GENESIS, event_entry_hash, new_chain_id
from stampd.records.checkpoint import (
    CheckpointSigner,
    Heads,
    PublicKey,
    heads_json,
    signature_valid,
    signed_bytes,
)
from stampd.records.maintenance import CHAINED_TABLES, STREAM_ROWS, TIME_COLUMN, open_at_head, row_fields
from stampd.records.schema import checkpoints, events

PURGED_EVENT = "records.purged"
DEFAULT_BATCH_ROWS = 5000
"""Rows deleted per step: on SQLite a step of this size holds the write lock for some tens of milliseconds."""
STEP_PAUSE_S = 0.05
"""The least pause between two steps on SQLite, so that the commits waiting for the lock get it: SQLite's busy
handler retries at most 50 ms apart within a serving process's 200 ms. A slower step is followed by a pause as
long as itself."""
PURGE_LOCK_WAIT_MS = 30_000
"""How long a purge step on SQLite waits for the write lock held by a serving process's commit."""
PURGE_LOCK_ID = 0x7374616D7064  # "stampd": the PostgreSQL advisory lock that serialises purge steps

Anchors = dict[str, dict[str, tuple[int, bytes]]]
"""table -> chain id -> (N, entry hash of seq N): entries 1..N of that chain were purged."""


@dataclass(frozen=True, slots=True)
class CheckpointKey:
    """The checkpoint key, both halves: the private one signs, the public one checks earlier checkpoints."""

    signer: CheckpointSigner
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class ChainCut:
    """One chain's prefix removed by this purge: seq ``from_seq``..``through_seq``."""

    table: str
    chain: str
    from_seq: int
    through_seq: int
    entry_hash: bytes
    """The entry hash of seq ``through_seq``: the prev_hash the chain's first remaining entry must have."""

    @property
    def count(self) -> int:
        return self.through_seq - self.from_seq + 1


@dataclass(slots=True)
class PurgeResult:
    """What a purge removed (or, with ``dry_run``, would remove) and the events that recorded it."""

    cutoff_us: int
    retention_us: int
    cuts: list[ChainCut] = field(default_factory=list)
    """Per chain, the whole prefix this run removes (its steps may each remove a part of it)."""
    unchained: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "events": 0})
    """Rows recorded before the chains existed (revision 0002), removed by time alone."""
    kept: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "events": 0})
    """Rows older than the cut-off kept because a younger entry precedes them in their chain."""
    anchors: Anchors = field(default_factory=dict)
    """Every chain's anchor once the run is done, the earlier purges' included."""
    dry_run: bool = False
    steps: int = 0
    """Transactions done (with ``dry_run``: that would be done)."""
    event_chain: str | None = None
    """The events chain of this run's ``records.purged`` events, one per step."""
    checkpoint_ids: list[int] = field(default_factory=list)
    longest_step_s: float = 0.0
    """The longest a step held the write lock (from taking it to its commit)."""

    def counts(self) -> dict[str, int]:
        """Rows removed per table."""
        removed = dict(self.unchained)
        for cut in self.cuts:
            removed[cut.table] += cut.count
        return removed

    def detail(self) -> dict[str, Any]:
        """What `--json` prints."""
        return {
            **self.cutoff_detail(),
            "purged": self.counts(),
            "kept_older": self.kept,
            "cuts": [[c.table, c.chain, c.from_seq, c.through_seq] for c in self.cuts],
            "anchors": anchors_json(self.anchors),
            "steps": self.steps,
            "longest_step_ms": round(self.longest_step_s * 1000, 1),
        }

    def cutoff_detail(self) -> dict[str, Any]:
        return {"cutoff": _iso(self.cutoff_us), "cutoff_us": self.cutoff_us, "retention_us": self.retention_us}


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows one step deletes from one chain: seq ``from_seq`` on, ``rows`` of them. ``chain`` None: rows recorded
    before the chains existed, the ``rows`` oldest of which go."""

    table: str
    chain: str | None
    from_seq: int
    rows: int

    @property
    def through_seq(self) -> int:
        return self.from_seq + self.rows - 1

    def split(self, rows: int) -> tuple[Piece, Piece]:
        """The first ``rows`` rows, and the rest."""
        first = Piece(self.table, self.chain, self.from_seq, rows)
        rest_from = self.from_seq + rows if self.chain is not None else self.from_seq
        return first, Piece(self.table, self.chain, rest_from, self.rows - rows)


def plan_steps(pieces: list[Piece], batch_rows: int) -> list[list[Piece]]:
    """The pieces cut into steps of at most ``batch_rows`` rows each, in order; one step (empty) when there is
    nothing to remove, so that every purge is recorded."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    steps: list[list[Piece]] = []
    current: list[Piece] = []
    room = batch_rows
    for whole in pieces:
        rest = whole
        while rest.rows > 0:
            taken, rest = rest.split(min(room, rest.rows))
            current.append(taken)
            room -= taken.rows
            if room == 0:
                steps.append(current)
                current, room = [], batch_rows
    if current or not steps:
        steps.append(current)
    return steps


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="microseconds")


def cut_through(last_old_seq: int, first_young_seq: int | None, anchored_through: int) -> int | None:
    """Where a chain is cut: after the last entry of its old prefix. ``last_old_seq`` is the highest seq older
    than the cut-off, ``first_young_seq`` the lowest seq not older (None: none), ``anchored_through`` the
    previous anchor (0: none). None when nothing more can go."""
    through = last_old_seq if first_young_seq is None else min(last_old_seq, first_young_seq - 1)
    return through if through > anchored_through else None


def anchors_json(anchors: Anchors) -> dict[str, dict[str, list[Any]]]:
    return {
        table: {chain: [seq, entry.hex()] for chain, (seq, entry) in sorted(chains.items())}
        for table, chains in sorted(anchors.items())
    }


def parse_anchors(detail: Mapping[str, Any]) -> Anchors:
    """The anchors of a ``records.purged`` event's detail; ValueError when they are not well formed."""
    value = detail.get("anchors")
    if not isinstance(value, dict):
        raise ValueError("no anchors")
    parsed: Anchors = {}
    for table, chains in value.items():
        if table not in CHAINED_TABLES or not isinstance(chains, dict):
            raise ValueError(f"unknown table {table!r}")
        for chain, pair in chains.items():
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] > 0):
                raise ValueError(f"{table} chain {chain}: expected [seq, entry hash]")
            entry = bytes.fromhex(pair[1]) if isinstance(pair[1], str) else b""
            if len(entry) != len(GENESIS):
                raise ValueError(f"{table} chain {chain}: the entry hash is not 32 bytes of hex")
            parsed.setdefault(table, {})[chain] = (pair[0], entry)
    return parsed


def merge_anchors(into: Anchors, more: Anchors) -> None:
    """Keep, per chain, the anchor that reaches furthest (each purge's anchors include every earlier one)."""
    for table, chains in more.items():
        known = into.setdefault(table, {})
        for chain, anchor in chains.items():
            if chain not in known or anchor[0] > known[chain][0]:
                known[chain] = anchor


def purge_records(
    url: str,
    *,
    retention_us: int,
    now_us: int,
    checkpoint: CheckpointKey | None,
    dry_run: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> PurgeResult:
    """Remove what is older than ``now_us - retention_us`` in steps of at most ``batch_rows`` rows (see the module
    docstring). ``checkpoint``: the checkpoint key that signs each step (None without records.checkpoint_key)."""
    result = PurgeResult(now_us - retention_us, retention_us, dry_run=dry_run)
    engine = open_at_head(url, "purging")
    try:
        with engine.connect() as conn, conn.begin():  # a read snapshot: the serving processes go on writing
            previous = _previous_anchors(conn, checkpoint)
            pieces = _plan(conn, result, previous)
        steps = plan_steps(pieces, batch_rows)
        result.steps = len(steps)
        if not dry_run:
            _Run(engine, result, checkpoint, previous, now_us).run(steps)
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot purge the records: {e}") from e
    finally:
        engine.dispose()
    return result


def _plan(conn: Connection, result: PurgeResult, previous: Anchors) -> list[Piece]:
    """Fill ``result`` with the cut of every chain and the anchors the run leads to; return the rows to delete."""
    result.anchors = {table: dict(chains) for table, chains in previous.items()}
    for table in CHAINED_TABLES.values():
        _plan_table(conn, table, result, previous.get(table.name, {}))
    merge_anchors(result.anchors, _cut_anchors(result.cuts))
    pieces = [Piece(c.table, c.chain, c.from_seq, c.count) for c in result.cuts]
    pieces.extend(Piece(table, None, 0, rows) for table, rows in result.unchained.items() if rows)
    return pieces


def _cut_anchors(cuts: list[ChainCut]) -> Anchors:
    anchors: Anchors = {}
    for cut in cuts:
        anchors.setdefault(cut.table, {})[cut.chain] = (cut.through_seq, cut.entry_hash)
    return anchors


def _plan_table(conn: Connection, table: Table, result: PurgeResult, anchored: Mapping[str, tuple[int, bytes]]) -> None:
    """The cut of every chain of ``table`` that has entries older than the cut-off."""
    name = table.name
    time_column = table.c[TIME_COLUMN[name]]
    old = conn.execute(
        select(table.c.chain, func.max(table.c.seq), func.count())
        .where(time_column < result.cutoff_us)
        .group_by(table.c.chain)
    ).all()
    for chain, last_old, old_count in old:
        if chain is None:
            result.unchained[name] = int(old_count)
            continue
        first_young = conn.execute(
            select(func.min(table.c.seq)).where(
                table.c.chain == chain, table.c.seq <= last_old, time_column >= result.cutoff_us
            )
        ).scalar()
        anchored_through = anchored.get(chain, (0, GENESIS))[0]
        through = cut_through(int(last_old), None if first_young is None else int(first_young), anchored_through)
        if through is None:
            result.kept[name] += int(old_count)
            continue
        entry = _entry_hash(conn, table, chain, through)
        first = _first_seq(conn, table, chain)
        if entry is None or first != anchored_through + 1:
            raise RecordingError(
                f"{name} chain {chain} does not start where its purge anchor says (seq {anchored_through + 1}): "
                "run `stampd audit verify` before purging"
            )
        result.cuts.append(ChainCut(name, chain, anchored_through + 1, through, entry))
        result.kept[name] += int(old_count) - (through - anchored_through)


def _entry_hash(conn: Connection, table: Table, chain: str, seq: int) -> bytes | None:
    entry = conn.execute(select(table.c.entry_hash).where(table.c.chain == chain, table.c.seq == seq)).scalar()
    return None if entry is None else bytes(entry)


def _first_seq(conn: Connection, table: Table, chain: str) -> int | None:
    first = conn.execute(select(func.min(table.c.seq)).where(table.c.chain == chain)).scalar()
    return None if first is None else int(first)


class _Run:
    """The steps of one purge, each its own transaction, recorded as seq 1, 2, ... of one events chain."""

    def __init__(
        self, engine: Engine, result: PurgeResult, checkpoint: CheckpointKey | None, previous: Anchors, now_us: int
    ) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._result = result
        self._checkpoint = checkpoint
        self._anchors = previous
        """The earlier purges' anchors, then also those of each step of this run once it has committed."""
        self._now_us = now_us
        self._started_ns = time.monotonic_ns()
        self._chain = new_chain_id()
        self._head = (0, GENESIS)

    def run(self, steps: list[list[Piece]]) -> None:
        result = self._result
        for number, pieces in enumerate(steps, 1):
            with self._transaction() as (conn, locked_ns):
                self._step(conn, number, len(steps), pieces)
            held = (time.monotonic_ns() - locked_ns) / 1e9
            result.longest_step_s = max(result.longest_step_s, held)
            if self._sqlite and number < len(steps):
                time.sleep(max(STEP_PAUSE_S, held))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[tuple[Connection, int]]:
        """One step's transaction, holding the write lock (SQLite) or the purge lock (PostgreSQL) from its start,
        so that nothing changes between the step's checks and its deletions."""
        with self._engine.connect() as conn:
            if self._sqlite:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={PURGE_LOCK_WAIT_MS}")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.begin()
                conn.execute(select(func.pg_advisory_xact_lock(PURGE_LOCK_ID)))
            locked_ns = time.monotonic_ns()
            try:
                yield conn, locked_ns
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def _step(self, conn: Connection, number: int, steps: int, pieces: list[Piece]) -> None:
        result = self._result
        cuts: list[ChainCut] = []
        removed = {"tokens": 0, "events": 0}
        for piece in pieces:
            removed[piece.table] += _delete(conn, piece, result.cutoff_us, cuts)
        anchors = {table: dict(chains) for table, chains in self._anchors.items()}
        merge_anchors(anchors, _cut_anchors(cuts))
        detail = {
            **result.cutoff_detail(),
            "step": number,
            "steps": steps,
            "purged": removed,
            "kept_older": result.kept,
            "cuts": [[c.table, c.chain, c.from_seq, c.through_seq] for c in cuts],
            "anchors": anchors_json(anchors),
        }
        at_us = self._now_us + (time.monotonic_ns() - self._started_ns) // 1000
        row: dict[str, Any] = {"at_us": at_us, "kind": PURGED_EVENT, "tsu": None, "detail": json.dumps(detail)}
        prev = self._head[1]
        entry = event_entry_hash(prev, self._chain, number, row)
        row.update(chain=self._chain, seq=number, prev_hash=prev, entry_hash=entry)
        conn.execute(insert(events), [row])
        checkpoint_id = None
        if self._checkpoint is not None:
            heads = _heads_after(conn, cuts)
            heads.setdefault("events", {})[self._chain] = [number, entry.hex()]
            signature = self._checkpoint.signer.sign(signed_bytes(at_us, heads))
            stored = {"at_us": at_us, "heads": heads_json(heads), "signature": signature}
            stored["signer"] = self._checkpoint.signer.key_id
            checkpoint_id = int(conn.execute(insert(checkpoints).returning(checkpoints.c.id), [stored]).scalar_one())
        # The run's state moves on only once nothing of the step can fail before its commit.
        self._head = (number, entry)
        self._anchors = anchors
        result.event_chain = self._chain
        if checkpoint_id is not None:
            result.checkpoint_ids.append(checkpoint_id)


def _delete(conn: Connection, piece: Piece, cutoff_us: int, cuts: list[ChainCut]) -> int:
    """Delete one piece; a chained piece is checked first (the chain still starts at its first seq) and must delete
    exactly its rows, all older than the cut-off, or the step is rolled back. Returns the rows deleted."""
    table = CHAINED_TABLES[piece.table]
    time_column = table.c[TIME_COLUMN[piece.table]]
    if piece.chain is None:
        key = next(iter(table.primary_key.columns))
        oldest = select(key).where(table.c.chain.is_(None), time_column < cutoff_us).limit(piece.rows)
        return int(conn.execute(delete(table).where(key.in_(oldest.scalar_subquery()))).rowcount)
    first = _first_seq(conn, table, piece.chain)
    entry = _entry_hash(conn, table, piece.chain, piece.through_seq)
    if first != piece.from_seq or entry is None:
        raise RecordingError(
            f"{piece.table} chain {piece.chain} starts at seq {first}, not at seq {piece.from_seq} as planned: "
            "another purge ran meanwhile, or the records were changed (run `stampd audit verify`)"
        )
    deleted = conn.execute(
        delete(table).where(
            table.c.chain == piece.chain,
            table.c.seq >= piece.from_seq,
            table.c.seq <= piece.through_seq,
            time_column < cutoff_us,
        )
    ).rowcount
    if deleted != piece.rows:
        raise RecordingError(
            f"{piece.table} chain {piece.chain} seq {piece.from_seq}-{piece.through_seq} are no longer all older "
            "than the cut-off: the records were changed since the purge was planned (run `stampd audit verify`)"
        )
    cuts.append(ChainCut(piece.table, piece.chain, piece.from_seq, piece.through_seq, entry))
    return int(deleted)


def _heads_after(conn: Connection, cuts: list[ChainCut]) -> Heads:
    """The heads of the cut chains once the step is done: what remains of each, or its anchor if nothing does."""
    heads: Heads = {"events": {}, "tokens": {}}
    for cut in cuts:
        table = CHAINED_TABLES[cut.table]
        last = conn.execute(
            select(table.c.seq, table.c.entry_hash)
            .where(table.c.chain == cut.chain)
            .order_by(table.c.seq.desc())
            .limit(1)
        ).first()
        seq, entry = (cut.through_seq, cut.entry_hash) if last is None else (int(last.seq), bytes(last.entry_hash))
        heads[cut.table][cut.chain] = [seq, entry.hex()]
    return heads


def _previous_anchors(conn: Connection, checkpoint: CheckpointKey | None) -> Anchors:
    """The anchors recorded by earlier purges, carried forward. Each event must be intact and, when this purge
    signs, covered by a checkpoint of the same key: a forged event must not have its anchors re-signed here."""
    anchors: Anchors = {}
    rows = conn.execute(select(events).where(events.c.kind == PURGED_EVENT).order_by(events.c.id)).all()
    intact: list[tuple[Any, str]] = []
    for row in rows:
        fields = row_fields(row)
        name = f"{PURGED_EVENT} event (events chain {row.chain} seq {row.seq})"
        intact_row = row.chain is not None and (
            event_entry_hash(fields["prev_hash"], row.chain, row.seq, fields) == fields["entry_hash"]
        )
        if not intact_row:
            raise RecordingError(f"{name} is not intact: run `stampd audit verify` before purging")
        intact.append((row, name))
    if checkpoint is not None and intact:
        wanted = {(row.chain, int(row.seq), bytes(row.entry_hash).hex()) for row, _ in intact}
        signed = _signed_marks(conn, checkpoint, wanted)
        for row, name in intact:
            if (row.chain, int(row.seq), bytes(row.entry_hash).hex()) not in signed:
                raise RecordingError(
                    f"{name} is covered by no checkpoint of records.checkpoint_key, so its anchors cannot be carried "
                    "forward: run `stampd audit verify`"
                )
    for row, name in intact:
        try:
            merge_anchors(anchors, parse_anchors(json.loads(row.detail)))
        except ValueError as e:
            raise RecordingError(f"{name}: its anchors are not readable: {e}") from e
    return anchors


def _signed_marks(
    conn: Connection, checkpoint: CheckpointKey, wanted: set[tuple[str, int, str]]
) -> set[tuple[str, int, str]]:
    """Which of the ``wanted`` events heads (chain, seq, entry hash) a valid checkpoint of this key signed. Only
    the checkpoints that name one are verified: there is one every few minutes for years."""
    public_key = checkpoint.public_key
    found: set[tuple[str, int, str]] = set()
    query = select(checkpoints).where(checkpoints.c.signer == checkpoint.signer.key_id).order_by(checkpoints.c.id)
    for row in conn.execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(query):
        try:
            heads = json.loads(row.heads)
            marks = {(chain, int(seq), str(entry)) for chain, (seq, entry) in heads.get("events", {}).items()}
        except (ValueError, TypeError, AttributeError):
            continue
        named = (marks & wanted) - found
        if named and signature_valid(public_key, signed_bytes(int(row.at_us), heads), bytes(row.signature)):
            found |= named
            if found == wanted:
                break
    return found
