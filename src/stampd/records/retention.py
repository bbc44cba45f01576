"""Retention: `stampd records purge` removes the tokens and events older than ``records.retention`` without
breaking the evidence (issue "Evidence that scales", item 4; RFC 3628 §7.4.11: records kept for the disclosed
period; SPEC OPS-08, OPS-09).

A hash chain can only lose a prefix: deleting entries from its middle would be indistinguishable from tampering.
So each chain (:mod:`stampd.records.chain`) is cut after its last entry ``N`` such that every entry up to ``N`` is
older than the cut-off; an old entry recorded after a younger one is kept (retention is a minimum, never a
maximum). What remains of a cut chain starts at seq ``N + 1``, whose prev_hash is the entry hash of seq ``N``:
that pair is the chain's *anchor*, ``[N, entry_hash hex]``.

One purge is one transaction: the deletions, a ``records.purged`` event (in a chain of its own, at seq 1) whose
detail holds the cut-off, the counts and the anchors of *every* chain ever cut (carried forward from the earlier
purge events, which this purge may itself remove), and, with a checkpoint key, a checkpoint signing that event
and the new heads of the cut chains. `stampd audit verify` lets a chain start after seq 1 only at such an anchor,
and (with a checkpoint key) only when a verified checkpoint covers the event that recorded it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.engine import Connection
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
from stampd.records.engine import open_engine, records_url
from stampd.records.migrate import current_revision, head_revision
from stampd.records.schema import checkpoints, events, tokens

PURGED_EVENT = "records.purged"
PURGE_LOCK_WAIT_MS = 30_000
"""How long a purge on SQLite waits for the write lock held by a serving process's commit."""

Anchors = dict[str, dict[str, tuple[int, bytes]]]
"""table -> chain id -> (N, entry hash of seq N): entries 1..N of that chain were purged."""

_TIME_COLUMN = {"tokens": "gen_time_us", "events": "at_us"}


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
    """What a purge removed (or, with ``dry_run``, would remove) and the event that recorded it."""

    cutoff_us: int
    retention_us: int
    cuts: list[ChainCut] = field(default_factory=list)
    unchained: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "events": 0})
    """Rows recorded before the chains existed (revision 0002), removed by time alone."""
    kept: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "events": 0})
    """Rows older than the cut-off kept because a younger entry precedes them in their chain."""
    anchors: Anchors = field(default_factory=dict)
    dry_run: bool = False
    event_chain: str | None = None
    checkpoint_id: int | None = None

    def counts(self) -> dict[str, int]:
        """Rows removed per table."""
        removed = dict(self.unchained)
        for cut in self.cuts:
            removed[cut.table] += cut.count
        return removed

    def detail(self) -> dict[str, Any]:
        """The ``records.purged`` event's detail (also what `--json` prints)."""
        return {
            "cutoff": _iso(self.cutoff_us),
            "cutoff_us": self.cutoff_us,
            "retention_us": self.retention_us,
            "purged": self.counts(),
            "kept_older": self.kept,
            "cuts": [[c.table, c.chain, c.from_seq, c.through_seq] for c in self.cuts],
            "anchors": anchors_json(self.anchors),
        }


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
        if table not in _TIME_COLUMN or not isinstance(chains, dict):
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
    url: str, *, retention_us: int, now_us: int, checkpoint: CheckpointKey | None, dry_run: bool = False
) -> PurgeResult:
    """Remove what is older than ``now_us - retention_us``, in one transaction (see the module docstring).
    ``checkpoint``: the checkpoint key that signs the result (None without records.checkpoint_key)."""
    revision = current_revision(url)
    if revision != head_revision():
        raise RecordingError(
            f"the records schema is at {revision or 'empty'}, purging needs {head_revision()}: run `stampd db upgrade`"
        )
    result = PurgeResult(now_us - retention_us, retention_us, dry_run=dry_run)
    try:
        engine = open_engine(url, create=False, pooled=False)
    except (SQLAlchemyError, ImportError, OSError) as e:
        shown = records_url(url).render_as_string(hide_password=True)
        raise RecordingError(f"cannot open the records at {shown}: {e}") from e
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # Take the write lock first, so that nothing changes between the plan and the deletions.
                conn.exec_driver_sql(f"PRAGMA busy_timeout={PURGE_LOCK_WAIT_MS}")
                conn.exec_driver_sql("BEGIN" if dry_run else "BEGIN IMMEDIATE")
            else:
                conn.begin()
            try:
                _purge(conn, result, now_us, checkpoint)
            except BaseException:
                conn.rollback()
                raise
            if dry_run:
                conn.rollback()
            else:
                conn.commit()
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot purge the records: {e}") from e
    finally:
        engine.dispose()
    return result


def _purge(conn: Connection, result: PurgeResult, now_us: int, checkpoint: CheckpointKey | None) -> None:
    previous = _previous_anchors(conn, checkpoint)
    result.anchors = {table: dict(chains) for table, chains in previous.items()}
    for table in (tokens, events):
        _plan_table(conn, table, result, previous.get(table.name, {}))
    merge_anchors(result.anchors, {c.table: {c.chain: (c.through_seq, c.entry_hash)} for c in result.cuts})
    if result.dry_run:
        return
    for cut in result.cuts:
        table = tokens if cut.table == "tokens" else events
        conn.execute(delete(table).where(table.c.chain == cut.chain, table.c.seq <= cut.through_seq))
    for table in (tokens, events):
        time_column = table.c[_TIME_COLUMN[table.name]]
        conn.execute(delete(table).where(table.c.chain.is_(None), time_column < result.cutoff_us))
    chain = new_chain_id()
    row: dict[str, Any] = {"at_us": now_us, "kind": PURGED_EVENT, "tsu": None, "detail": json.dumps(result.detail())}
    entry = event_entry_hash(GENESIS, chain, 1, row)
    row.update(chain=chain, seq=1, prev_hash=GENESIS, entry_hash=entry)
    conn.execute(insert(events), [row])
    result.event_chain = chain
    if checkpoint is not None:
        signer = checkpoint.signer
        heads = _heads_after(conn, result)
        heads.setdefault("events", {})[chain] = [1, entry.hex()]
        signature = signer.sign(signed_bytes(now_us, heads))
        stored = {"at_us": now_us, "heads": heads_json(heads), "signature": signature, "signer": signer.key_id}
        result.checkpoint_id = int(conn.execute(insert(checkpoints).returning(checkpoints.c.id), [stored]).scalar_one())


def _plan_table(conn: Connection, table: Table, result: PurgeResult, anchored: Mapping[str, tuple[int, bytes]]) -> None:
    """The cut of every chain of ``table`` that has entries older than the cut-off."""
    name = table.name
    time_column = table.c[_TIME_COLUMN[name]]
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
        entry = conn.execute(select(table.c.entry_hash).where(table.c.chain == chain, table.c.seq == through)).scalar()
        first = conn.execute(select(func.min(table.c.seq)).where(table.c.chain == chain)).scalar()
        if entry is None or first is None or int(first) != anchored_through + 1:
            raise RecordingError(
                f"{name} chain {chain} does not start where its purge anchor says (seq {anchored_through + 1}): "
                "run `stampd audit verify` before purging"
            )
        result.cuts.append(ChainCut(name, chain, anchored_through + 1, through, bytes(entry)))
        result.kept[name] += int(old_count) - (through - anchored_through)


def _heads_after(conn: Connection, result: PurgeResult) -> Heads:
    """The heads of the cut chains once the purge is done: what remains of each, or its anchor if nothing does."""
    heads: Heads = {"events": {}, "tokens": {}}
    for cut in result.cuts:
        table = tokens if cut.table == "tokens" else events
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
    signed = _signed_marks(conn, checkpoint) if checkpoint is not None and rows else set()
    for row in rows:
        fields = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row._mapping.items()}
        name = f"{PURGED_EVENT} event (events chain {row.chain} seq {row.seq})"
        if (
            row.chain is None
            or event_entry_hash(fields["prev_hash"], row.chain, row.seq, fields) != fields["entry_hash"]
        ):
            raise RecordingError(f"{name} is not intact: run `stampd audit verify` before purging")
        if checkpoint is not None and (row.chain, int(row.seq), fields["entry_hash"].hex()) not in signed:
            raise RecordingError(
                f"{name} is covered by no checkpoint of records.checkpoint_key, so its anchors cannot be carried "
                "forward: run `stampd audit verify`"
            )
        try:
            merge_anchors(anchors, parse_anchors(json.loads(row.detail)))
        except ValueError as e:
            raise RecordingError(f"{name}: its anchors are not readable: {e}") from e
    return anchors


def _signed_marks(conn: Connection, checkpoint: CheckpointKey) -> set[tuple[str, int, str]]:
    """(chain, seq, entry hash) of every events head signed by a valid checkpoint of this key."""
    public_key = checkpoint.public_key
    marks: set[tuple[str, int, str]] = set()
    for row in conn.execute(select(checkpoints).where(checkpoints.c.signer == checkpoint.signer.key_id)):
        try:
            heads = json.loads(row.heads)
            valid = signature_valid(public_key, signed_bytes(int(row.at_us), heads), bytes(row.signature))
        except (ValueError, TypeError):
            continue
        if valid:
            marks.update((chain, int(seq), str(entry)) for chain, (seq, entry) in heads.get("events", {}).items())
    return marks
