"""The audit of the records' hash chains and checkpoints (`stampd audit verify`): reads only.

Steps:
1. Every checkpoint's signature is checked with the checkpoint key's public key; the (seq, entry hash) it
   signed for each chain is kept.
2. Every chain of tokens and of events is walked in seq order: seq 1, 2, 3... without gaps or duplicates, each
   entry's prev_hash is the entry hash before it, and each entry hash recomputes from the row's fields.
3. Each chain still reaches every checkpointed (seq, hash): a tail rewritten or cut short after a checkpoint is
   caught there.
4. A chain starts at seq 1, or right after the anchor ``[N, entry hash]`` that a ``records.purged`` event recorded
   for it (:mod:`stampd.records.retention`): its first entry is then seq N + 1 and its prev_hash is that hash.
   The event must itself be intact and, when checkpoints are checked, covered by a verified checkpoint; a
   checkpoint that signed seq N must agree with the anchor.
A chain stops at its first bad entry, which the report names (table, chain, seq, serial or event kind, what is
wrong). Rows recorded before the chains existed (revision 0002) are counted as unchained: they cannot be checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from stampd.errors import RecordingError
from stampd.records.chain import GENESIS
from stampd.records.checkpoint import PublicKey, signature_valid, signed_bytes, spki_sha256
from stampd.records.maintenance import ENTRY_HASHERS, STREAM_ROWS, Findings, open_at_head, row_fields
from stampd.records.retention import PURGED_EVENT, parse_anchors
from stampd.records.schema import checkpoints, events, tokens


@dataclass(slots=True)
class ChainReport:
    """One chain of one table as the audit found it."""

    table: str
    chain: str
    count: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS.hex()
    checkpointed_seq: int = 0
    """The highest seq a valid checkpoint covers: entries after it are chained but not signed yet."""
    purged_through: int = 0
    """Entries 1..purged_through were removed by a recorded purge (0: none)."""
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "chain": self.chain,
            "count": self.count,
            "head": [self.head_seq, self.head_hash],
            "checkpointed_seq": self.checkpointed_seq,
            "purged_through": self.purged_through,
            "problem": self.problem,
        }


@dataclass(slots=True)
class AuditReport(Findings):
    """Every problem, the chains' first bad entries included, and what was walked."""

    chains: list[ChainReport] = field(default_factory=list)
    unchained: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    """Checkpoints whose signature verified."""

    def details(self) -> dict[str, Any]:
        return {
            "chains": [c.as_dict() for c in self.chains],
            "unchained": self.unchained,
            "checkpoints": self.checkpoints,
        }


@dataclass(frozen=True, slots=True)
class _Signed:
    seq: int
    entry_hash: str
    checkpoint: int
    at_us: int

    def named(self) -> str:
        at = datetime.fromtimestamp(self.at_us / 1e6, UTC).isoformat(timespec="seconds")
        return f"checkpoint {self.checkpoint} ({at})"


@dataclass(frozen=True, slots=True)
class _Anchor:
    """Entries 1..seq of a chain were purged; its next entry follows ``entry_hash``. Recorded by the
    ``records.purged`` event at (source_chain, source_seq)."""

    seq: int
    entry_hash: bytes
    source_chain: str
    source_seq: int

    def named(self) -> str:
        return f"the purge anchor of the {PURGED_EVENT} event at events chain {self.source_chain} seq {self.source_seq}"


def audit_records(url: str, public_key: PublicKey | None) -> AuditReport:
    """Walk every chain of the records at ``url`` and check every checkpoint with ``public_key``."""
    engine = open_at_head(url, "the audit")
    try:
        report = AuditReport()
        signed = _checkpoints(engine, public_key, report)
        anchors = _anchors(engine, report)
        for table in (tokens, events):
            _walk_table(engine, table, signed, anchors, report)
        _check_anchor_sources(anchors, report, signed_required=public_key is not None)
        return report
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot read the records: {e}") from e
    finally:
        engine.dispose()


def _checkpoints(
    engine: Engine, public_key: PublicKey | None, report: AuditReport
) -> dict[tuple[str, str], list[_Signed]]:
    """Step 1: the (seq, hash) each valid checkpoint signed, by (table, chain)."""
    with engine.connect() as conn:
        rows = conn.execute(select(checkpoints).order_by(checkpoints.c.id)).all()
    signed: dict[tuple[str, str], list[_Signed]] = {}
    if rows and public_key is None:
        report.problems.append(
            f"{len(rows)} checkpoints cannot be checked without the checkpoint key's public key "
            "(records.checkpoint_key or --public-key)"
        )
        return signed
    key_id = spki_sha256(public_key) if public_key is not None else ""
    for row in rows:
        name = f"checkpoint {row.id}"
        if row.signer != key_id:
            report.problems.append(f"{name}: signed by another key (SPKI SHA-256 {row.signer})")
            continue
        try:
            heads = json.loads(row.heads)
            data = signed_bytes(int(row.at_us), heads)
        except (ValueError, TypeError):
            report.problems.append(f"{name}: its chain heads are not readable")
            continue
        if not signature_valid(public_key, data, bytes(row.signature)):  # type: ignore[arg-type]
            report.problems.append(f"{name}: the signature does not verify (edited or forged)")
            continue
        report.checkpoints += 1
        for table, chains in heads.items():
            for chain, (seq, entry_hash) in chains.items():
                if seq > 0:
                    signed.setdefault((table, chain), []).append(_Signed(seq, entry_hash, row.id, row.at_us))
    return signed


def _anchors(engine: Engine, report: AuditReport) -> dict[tuple[str, str], _Anchor]:
    """Step 4: per (table, chain), the furthest anchor any ``records.purged`` event recorded (each purge carries
    the earlier ones forward); whether its event can be trusted is checked once the chains are walked."""
    query = select(events.c.chain, events.c.seq, events.c.detail).where(
        events.c.kind == PURGED_EVENT, events.c.chain.is_not(None)
    )
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(events.c.id)).all()
    found: dict[tuple[str, str], _Anchor] = {}
    for row in rows:
        try:
            recorded = parse_anchors(json.loads(row.detail))
        except (ValueError, TypeError) as e:
            report.problems.append(f"{PURGED_EVENT} event at events chain {row.chain} seq {row.seq}: {e}")
            continue
        for table, chains in recorded.items():
            for chain, (seq, entry_hash) in chains.items():
                known = found.get((table, chain))
                if known is None or seq >= known.seq:
                    found[(table, chain)] = _Anchor(seq, entry_hash, row.chain, int(row.seq))
    return found


def _check_anchor_sources(anchors: dict[tuple[str, str], _Anchor], report: AuditReport, signed_required: bool) -> None:
    """An anchor lets a chain start late only if the event that recorded it walked intact (and, with checkpoints,
    is signed): otherwise anyone could delete a chain's start and add a forged purge event of their own."""
    walked = {(c.table, c.chain): c for c in report.chains}
    for (table, chain), anchor in sorted(anchors.items()):
        source = walked.get(("events", anchor.source_chain))
        if source is None or source.head_seq < anchor.source_seq:
            reason = "not intact"
        elif signed_required and source.checkpointed_seq < anchor.source_seq:
            reason = "covered by no verified checkpoint"
        else:
            continue
        problem = f"{table} chain {chain}: starts after seq {anchor.seq} by {anchor.named()}, which is {reason}"
        report.problems.append(problem)
        chain_report = walked.get((table, chain))
        if chain_report is not None and chain_report.problem is None:
            chain_report.problem = problem


def _identify(table: str, row: Any) -> str:
    return f"serial 0x{row.serial}" if table == "tokens" else f"event {row.kind}"


def _walk_table(
    engine: Engine,
    table: Table,
    signed: dict[tuple[str, str], list[_Signed]],
    anchors: dict[tuple[str, str], _Anchor],
    report: AuditReport,
) -> None:
    """Steps 2, 3 and 4 for every chain of ``table``."""
    name = table.name
    with engine.connect() as conn:
        report.unchained[name] = int(
            conn.execute(select(func.count()).select_from(table).where(table.c.chain.is_(None))).scalar_one()
        )
        query = select(table).where(table.c.chain.is_not(None)).order_by(table.c.chain, table.c.seq)
        result = conn.execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(query)
        current: ChainReport | None = None
        walker: _ChainWalk | None = None
        for row in result:
            if current is None or row.chain != current.chain:
                if walker is not None:
                    walker.finish()
                current = ChainReport(name, row.chain)
                report.chains.append(current)
                key = (name, row.chain)
                walker = _ChainWalk(engine, table, current, signed.get(key, []), anchors.get(key))
            assert walker is not None
            walker.step(row)
        if walker is not None:
            walker.finish()
    seen = {c.chain for c in report.chains if c.table == name}
    for (anchored_table, chain), anchor in sorted(anchors.items()):
        if anchored_table == name and chain not in seen:  # purged to its last entry: nothing left to walk
            emptied = ChainReport(name, chain)
            report.chains.append(emptied)
            _ChainWalk(engine, table, emptied, signed.get((name, chain), []), anchor).finish()
            seen.add(chain)
    for (signed_table, chain), marks in sorted(signed.items()):
        if signed_table == name and chain not in seen:
            mark = max(marks, key=lambda m: m.seq)
            missing = ChainReport(name, chain)
            missing.problem = f"{name} chain {chain}: {mark.named()} has seq {mark.seq}, but the chain has no entries"
            report.chains.append(missing)
    report.problems.extend(c.problem for c in report.chains if c.table == name and c.problem)


class _ChainWalk:
    """One chain, entry by entry, until its first bad entry."""

    def __init__(
        self, engine: Engine, table: Table, report: ChainReport, marks: Iterable[_Signed], anchor: _Anchor | None
    ) -> None:
        self._engine = engine
        self._table = table
        self._report = report
        self._hash = ENTRY_HASHERS[table.name]
        self._marks = {m.seq: m for m in sorted(marks, key=lambda m: m.checkpoint)}
        self._prev = GENESIS
        self._anchor = anchor
        if anchor is not None:
            self._start_after(anchor)

    def _start_after(self, anchor: _Anchor) -> None:
        """The chain continues after a purge: checkpoints of purged entries can no longer be walked to, but one
        that signed the last purged entry must agree with the anchor."""
        r = self._report
        r.purged_through = r.head_seq = anchor.seq
        r.head_hash = anchor.entry_hash.hex()
        self._prev = anchor.entry_hash
        mark = self._marks.get(anchor.seq)
        if mark is not None and mark.entry_hash != r.head_hash:
            self._fail(anchor.seq, None, f"{anchor.named()} differs from {mark.named()}")
        elif mark is not None:
            r.checkpointed_seq = anchor.seq
        self._marks = {seq: m for seq, m in self._marks.items() if seq > anchor.seq}

    def _fail(self, seq: int, row: Any, what: str) -> None:
        r = self._report
        ident = f" ({_identify(r.table, row)})" if row is not None else ""
        r.problem = f"{r.table} chain {r.chain} seq {seq}{ident}: {what}"

    def step(self, row: Any) -> None:
        r = self._report
        if r.problem is not None:
            return
        expected = r.head_seq + 1
        fields = row_fields(row)
        seq = int(row.seq)
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}-{seq - 1}"
            self._fail(seq, row, f"missing entry before it ({missing} deleted)")
            return
        anchor = self._anchor if r.count == 0 else None
        if seq < expected and anchor is not None:
            self._fail(seq, row, f"present, but seq 1-{anchor.seq} were purged by {anchor.named()}")
            return
        if seq < expected:
            self._fail(seq, row, f"duplicate seq (seq {seq} appears twice)")
            return
        if fields["prev_hash"] != self._prev and anchor is not None:
            self._fail(
                seq,
                row,
                f"does not follow {anchor.named()} (its prev_hash is not the entry hash of seq {anchor.seq}): "
                "the entry or the anchor was edited",
            )
            return
        if fields["prev_hash"] != self._prev:
            self._misplaced(seq, row, fields)
            return
        if self._hash(self._prev, r.chain, seq, fields) != fields["entry_hash"]:
            self._fail(seq, row, "edited (its fields no longer hash to its entry hash)")
            return
        mark = self._marks.get(seq)
        if mark is not None and mark.entry_hash != fields["entry_hash"].hex():
            self._fail(seq, row, f"differs from {mark.named()}: the chain was rewritten up to here")
            return
        self._prev = fields["entry_hash"]
        r.count += 1
        r.head_seq = seq
        r.head_hash = self._prev.hex()
        if mark is not None:
            r.checkpointed_seq = seq

    def _misplaced(self, seq: int, row: Any, fields: dict[str, Any]) -> None:
        """The entry does not follow the one before it: find the entry it was recorded after to say why."""
        r = self._report
        prev_hash = fields["prev_hash"]
        table = self._table
        if prev_hash == GENESIS:
            after: int | None = 0
        else:
            query = select(table.c.seq).where(table.c.chain == r.chain, table.c.entry_hash == prev_hash).limit(1)
            with self._engine.connect() as conn:
                found = conn.execute(query).scalar()
            after = None if found is None else int(found)
        if after is None:
            self._fail(seq, row, "missing entry before it (the entry it was recorded after is gone or was edited)")
            return
        recorded_at = self._recorded_at(after, fields)
        if recorded_at is None or recorded_at == seq:
            self._fail(seq, row, "edited (it no longer links to the entry before it)")
        elif recorded_at == after + 1 and recorded_at < seq:
            query = select(table).where(table.c.chain == r.chain, table.c.seq == recorded_at)
            with self._engine.connect() as conn:
                forged = conn.execute(query).first()
            self._fail(
                recorded_at,
                forged,
                f"inserted (the entry now at seq {seq}, {_identify(r.table, row)}, was recorded right after "
                f"seq {after})",
            )
        else:
            self._fail(seq, row, f"out of order (this entry was recorded at seq {recorded_at})")

    def _recorded_at(self, after: int, fields: dict[str, Any]) -> int | None:
        """The seq the entry was recorded at, if its fields still hash to its entry hash there: right after the
        entry it follows (``after``, where that entry sits now), or at ``after`` itself when that entry was moved
        one place on, as when two neighbours were swapped. The hash covers the seq, so a match is proof."""
        chain = self._report.chain
        for candidate in (after + 1, after):
            if candidate > 0 and self._hash(fields["prev_hash"], chain, candidate, fields) == fields["entry_hash"]:
                return candidate
        return None

    def finish(self) -> None:
        r = self._report
        if r.problem is not None:
            return
        for mark in sorted(self._marks.values(), key=lambda m: m.seq):
            if mark.seq > r.head_seq:
                self._fail(
                    r.head_seq + 1,
                    None,
                    f"missing: {mark.named()} has seq {mark.seq}, the chain ends at seq {r.head_seq} "
                    "(entries deleted from its end)",
                )
                return
