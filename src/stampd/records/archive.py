"""Records archives: `stampd records export` writes one self-contained file that `stampd records verify-archive`
checks offline, with no configuration and no database (issue "Evidence that scales", item 4; RFC 3628 §7.4.11,
§7.4.9: records kept and made available after termination; SPEC OPS-08, OPS-09, OPS-11).

The file is a ZIP (ZIP64 where needed) with these members:

- ``manifest.json``: ``format`` (``stampd-archive-v1``), the range ``[from, to)`` in microseconds, the counts, the
  SHA-256 and size of every other member, which certificate members are trust anchors, and the SHA-256 of the
  checkpoint key's SubjectPublicKeyInfo;
- ``manifest.sig``: with a checkpoint key, its signature over the bytes of ``manifest.json`` (so every member is
  signed, not only the chain heads that checkpoints cover);
- ``tokens.jsonl`` and ``events.jsonl``: one JSON object per row with genTime (tokens) or time (events) in the
  range, every column, binary columns in hexadecimal, ordered by chain and seq;
- ``segments.json``: each run of consecutive entries of one chain in the archive, with the prev_hash of its first
  entry and the entry hash of its last: the anchors its hash chain is verified from;
- ``checkpoints.jsonl``: every checkpoint that signed an entry in a segment (or the entry just before one);
- ``checkpoint-key.pem``: the checkpoint key's public key; ``certs/...pem``: each TSU's certificates and chain,
  and its trust anchor.

:func:`verify_archive` checks, in order: the manifest and its signature, every member's hash, the checkpoints'
signatures, each segment's hash chain and its boundaries, every checkpointed head that falls in a segment, and
every token with :func:`stampd.verify.verify_timestamp` (chain to the archived trust anchors at genTime) and
against its row (serial, genTime, imprint, hash algorithm, policy, nonce).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import LargeBinary, Table, select
from sqlalchemy.exc import SQLAlchemyError

from stampd.der.token_reader import is_bare_token, read_response, read_token
from stampd.errors import ParseError, RecordingError, VerificationError
from stampd.records.chain import GENESIS, event_entry_hash, token_entry_hash
from stampd.records.checkpoint import PublicKey, load_public_key, signature_valid, signed_bytes, spki_sha256
from stampd.records.engine import open_engine, records_url
from stampd.records.migrate import current_revision, head_revision
from stampd.records.retention import CheckpointKey
from stampd.records.schema import checkpoints, events, tokens
from stampd.verify import verify_timestamp

ARCHIVE_FORMAT = "stampd-archive-v1"
MANIFEST = "manifest.json"
MANIFEST_SIGNATURE = "manifest.sig"
CHECKPOINT_KEY_MEMBER = "checkpoint-key.pem"
STREAM_ROWS = 2000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TABLES: dict[str, Table] = {"tokens": tokens, "events": events}
_TIME_COLUMN = {"tokens": "gen_time_us", "events": "at_us"}
_HASHERS: dict[str, Callable[[bytes, str, int, Mapping[str, Any]], bytes]] = {
    "tokens": token_entry_hash,
    "events": event_entry_hash,
}


def _binary_columns(table: Table) -> frozenset[str]:
    return frozenset(c.name for c in table.columns if isinstance(c.type, LargeBinary))


_BINARY = {name: _binary_columns(table) for name, table in _TABLES.items()}


@dataclass(frozen=True, slots=True)
class ArchiveCertificate:
    """A PEM file to archive: ``member`` is its name under ``certs/``; trust anchors are the roots of validation."""

    member: str
    pem: bytes
    trust_anchor: bool


@dataclass(slots=True)
class ExportSummary:
    counts: dict[str, int]
    segments: int
    signed: bool


@dataclass(slots=True)
class _Segment:
    table: str
    chain: str
    first_seq: int
    prev_hash: str
    last_seq: int
    entry_hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "chain": self.chain,
            "first_seq": self.first_seq,
            "prev_hash": self.prev_hash,
            "last_seq": self.last_seq,
            "entry_hash": self.entry_hash,
        }


class _HashingWriter:
    """Writes a ZIP member and remembers its SHA-256 and size for the manifest."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)


def _encode_row(table: str, row: Any) -> dict[str, Any]:
    values = dict(row._mapping)
    binary = _BINARY[table]
    return {k: (bytes(v).hex() if k in binary and v is not None else v) for k, v in values.items()}


def _decode_row(table: str, values: Mapping[str, Any]) -> dict[str, Any]:
    binary = _BINARY[table]
    return {k: (bytes.fromhex(v) if k in binary and isinstance(v, str) else v) for k, v in values.items()}


def iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


def export_archive(
    url: str,
    target: Path,
    *,
    from_us: int,
    to_us: int,
    certificates: list[ArchiveCertificate],
    checkpoint: CheckpointKey | None,
    now_us: int,
) -> ExportSummary:
    """Write the archive of ``[from_us, to_us)`` to ``target`` atomically: a temporary file in the same directory,
    renamed into place only when complete; an existing ``target`` is never replaced."""
    revision = current_revision(url)
    if revision != head_revision():
        raise RecordingError(f"the records schema is at {revision or 'empty'}, export needs {head_revision()}")
    if target.exists():
        raise RecordingError(f"{target} exists: an archive is never overwritten")
    try:
        engine = open_engine(url, create=False, pooled=False)
    except (SQLAlchemyError, ImportError, OSError) as e:
        shown = records_url(url).render_as_string(hide_password=True)
        raise RecordingError(f"cannot open the records at {shown}: {e}") from e
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            summary = _write(
                engine,
                archive,
                from_us=from_us,
                to_us=to_us,
                certificates=certificates,
                checkpoint=checkpoint,
                now_us=now_us,
            )
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temporary, 0o644)  # an archive holds no secret; it is meant to be handed over
        os.link(temporary, target)  # fails if target appeared meanwhile: nothing is ever replaced
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot read the records: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        engine.dispose()
    return summary


def _write(
    engine: Any,
    archive: zipfile.ZipFile,
    *,
    from_us: int,
    to_us: int,
    certificates: list[ArchiveCertificate],
    checkpoint: CheckpointKey | None,
    now_us: int,
) -> ExportSummary:
    members: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    segments: list[_Segment] = []

    def member(name: str) -> Iterator[_HashingWriter]:
        with archive.open(name, "w", force_zip64=True) as out:
            writer = _HashingWriter(out)
            yield writer
        members[name] = {"sha256": writer.sha256.hexdigest(), "size": writer.size}

    member_writer = contextlib.contextmanager(member)
    with engine.connect() as conn:
        for name, table in _TABLES.items():
            time_column = table.c[_TIME_COLUMN[name]]
            query = (
                select(table)
                .where(time_column >= from_us, time_column < to_us)
                .order_by(table.c.chain, table.c.seq, time_column)
            )
            result = conn.execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(query)
            count = 0
            with member_writer(f"{name}.jsonl") as out:
                for row in result:
                    out.write(json.dumps(_encode_row(name, row), sort_keys=True).encode() + b"\n")
                    count += 1
                    _extend_segments(segments, name, row)
            counts[name] = count
        kept = 0
        with member_writer("checkpoints.jsonl") as out:
            for row in conn.execute(select(checkpoints).order_by(checkpoints.c.id)):
                if _covers(json.loads(row.heads), segments):
                    values = dict(row._mapping)
                    values["signature"] = bytes(values["signature"]).hex()
                    out.write(json.dumps(values, sort_keys=True).encode() + b"\n")
                    kept += 1
        counts["checkpoints"] = kept
    with member_writer("segments.json") as out:
        out.write(json.dumps([s.as_dict() for s in segments], indent=1).encode() + b"\n")
    for certificate in certificates:
        with member_writer(f"certs/{certificate.member}") as out:
            out.write(certificate.pem)
    key_id = None
    if checkpoint is not None:
        with member_writer(CHECKPOINT_KEY_MEMBER) as out:
            out.write(
                checkpoint.public_key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        key_id = spki_sha256(checkpoint.public_key)
    manifest = {
        "format": ARCHIVE_FORMAT,
        "created": iso(now_us),
        "from": iso(from_us),
        "to": iso(to_us),
        "from_us": from_us,
        "to_us": to_us,
        "counts": counts,
        "members": members,
        "trust_anchors": sorted(f"certs/{c.member}" for c in certificates if c.trust_anchor),
        "certificates": sorted(f"certs/{c.member}" for c in certificates if not c.trust_anchor),
        "checkpoint_key_sha256": key_id,
    }
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    archive.writestr(MANIFEST, manifest_bytes)
    if checkpoint is not None:
        archive.writestr(MANIFEST_SIGNATURE, checkpoint.signer.sign(manifest_bytes))
    return ExportSummary(counts, len(segments), checkpoint is not None)


def _extend_segments(segments: list[_Segment], table: str, row: Any) -> None:
    if row.chain is None:
        return
    last = segments[-1] if segments else None
    seq = int(row.seq)
    if last is not None and (last.table, last.chain, last.last_seq + 1) == (table, row.chain, seq):
        last.last_seq = seq
        last.entry_hash = bytes(row.entry_hash).hex()
        return
    segments.append(_Segment(table, row.chain, seq, bytes(row.prev_hash).hex(), seq, bytes(row.entry_hash).hex()))


def _covers(heads: Mapping[str, Any], segments: list[_Segment]) -> bool:
    """Whether a checkpoint signed an entry of a segment, or the entry right before one."""
    for segment in segments:
        mark = heads.get(segment.table, {}).get(segment.chain)
        if mark is not None and segment.first_seq - 1 <= mark[0] <= segment.last_seq:
            return True
    return False


# --- verification ---


@dataclass(slots=True)
class ArchiveReport:
    """What `stampd records verify-archive` found; ``problems[0]`` is the first bad item."""

    counts: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    checkpoints: int = 0
    signed_entries: int = 0
    """Entries at or before a checkpointed head in their segment: covered by a checkpoint signature."""
    manifest_signed: bool = False
    checkpoint_key_sha256: str | None = None
    range: tuple[str, str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "range": list(self.range) if self.range else None,
            "counts": self.counts,
            "segments": self.segments,
            "checkpoints": self.checkpoints,
            "signed_entries": self.signed_entries,
            "manifest_signed": self.manifest_signed,
            "checkpoint_key_sha256": self.checkpoint_key_sha256,
            "problems": self.problems,
        }


class _Bad(Exception):
    """Stops the verification at an item that makes the rest meaningless (the manifest, a member's hash)."""


def verify_archive(path: Path, *, pinned_key: PublicKey | None = None) -> ArchiveReport:
    """Check the archive at ``path`` offline (see the module docstring). ``pinned_key``: the checkpoint key the
    archive must be signed with (the archive's own key proves nothing by itself)."""
    report = ArchiveReport()
    try:
        with zipfile.ZipFile(path) as archive:
            _Verification(archive, report, pinned_key).run()
    except _Bad as e:
        report.problems.insert(0, str(e))
    except (zipfile.BadZipFile, OSError) as e:
        report.problems.insert(0, f"{path}: not a readable archive: {e}")
    return report


class _Verification:
    def __init__(self, archive: zipfile.ZipFile, report: ArchiveReport, pinned_key: PublicKey | None) -> None:
        self.archive = archive
        self.report = report
        self.pinned_key = pinned_key
        self.manifest: dict[str, Any] = {}
        self.key: PublicKey | None = None
        self.marks: dict[tuple[str, str], dict[int, list[tuple[int, str]]]] = {}
        self.segments: list[_Segment] = []

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def run(self) -> None:
        self.step1_manifest()
        self.step2_members()
        anchors, others = self.step3_certificates()
        self.step4_checkpoints()
        for table in _TABLES:  # the order export writes them in, so segments compare in order
            self.step5_chain(table, anchors, others)
        self.step6_segments()

    # 1. The manifest, its format and (with a checkpoint key) its signature.
    def step1_manifest(self) -> None:
        try:
            data = self.archive.read(MANIFEST)
            manifest = json.loads(data)
        except (KeyError, ValueError) as e:
            raise _Bad(f"{MANIFEST}: missing or not JSON ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
            raise _Bad(f"{MANIFEST}: not a {ARCHIVE_FORMAT} manifest")
        self.manifest = manifest
        self.report.range = (str(manifest.get("from")), str(manifest.get("to")))
        self.report.counts = dict(manifest.get("counts", {}))
        key_id = manifest.get("checkpoint_key_sha256")
        names = set(self.archive.namelist())
        if key_id is not None:
            try:
                self.key = load_public_key(self.archive.read(CHECKPOINT_KEY_MEMBER))
            except (KeyError, ValueError) as e:
                raise _Bad(f"{CHECKPOINT_KEY_MEMBER}: missing or not a public key ({e})") from e
            if spki_sha256(self.key) != key_id:
                raise _Bad(f"{CHECKPOINT_KEY_MEMBER}: not the key the manifest names ({key_id})")
            self.report.checkpoint_key_sha256 = key_id
        if self.pinned_key is not None and (key_id is None or key_id != spki_sha256(self.pinned_key)):
            raise _Bad(f"{MANIFEST}: not signed by the given checkpoint key (archive key: {key_id or 'none'})")
        if MANIFEST_SIGNATURE in names or key_id is not None:
            if self.key is None or MANIFEST_SIGNATURE not in names:
                raise _Bad(f"{MANIFEST_SIGNATURE}: the manifest signature or its key is missing")
            if not signature_valid(self.key, data, self.archive.read(MANIFEST_SIGNATURE)):
                raise _Bad(f"{MANIFEST_SIGNATURE}: the signature over {MANIFEST} does not verify (edited or forged)")
            self.report.manifest_signed = True

    # 2. Every member is listed, and its SHA-256 and size match.
    def step2_members(self) -> None:
        listed: dict[str, Any] = self.manifest.get("members", {})
        present = set(self.archive.namelist()) - {MANIFEST, MANIFEST_SIGNATURE}
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise _Bad(f"{unlisted[0]}: a member the manifest does not list")
        for name, expected in sorted(listed.items()):
            if name not in present:
                raise _Bad(f"{name}: listed in the manifest but missing from the archive")
            digest = hashlib.sha256()
            size = 0
            with self.archive.open(name) as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
            if digest.hexdigest() != expected.get("sha256") or size != expected.get("size"):
                raise _Bad(f"{name}: its SHA-256 or size is not the manifest's (the member was altered)")

    # 3. The certificates: trust anchors and the others (TSU certificates, intermediates).
    def step3_certificates(self) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        loaded: dict[str, list[x509.Certificate]] = {"trust_anchors": [], "certificates": []}
        for role, certificates in loaded.items():
            for name in self.manifest.get(role, []):
                try:
                    certificates.extend(x509.load_pem_x509_certificates(self.archive.read(name)))
                except (KeyError, ValueError) as e:
                    self.problem(f"{name}: no readable certificate ({e})")
        if not loaded["trust_anchors"]:
            self.problem(f"{MANIFEST}: no trust anchor: the tokens cannot be verified")
        return loaded["trust_anchors"], loaded["certificates"]

    # 4. The checkpoints' signatures; the heads they signed are compared with the entries in step 5.
    def step4_checkpoints(self) -> None:
        for number, values in self._lines("checkpoints.jsonl"):
            name = f"checkpoints.jsonl line {number} (checkpoint {values.get('id')})"
            if self.key is None:
                self.problem(f"{name}: the archive has no checkpoint key to check it with")
                return
            try:
                heads = json.loads(values["heads"])
                valid = signature_valid(
                    self.key, signed_bytes(int(values["at_us"]), heads), bytes.fromhex(values["signature"])
                )
            except (KeyError, ValueError, TypeError):
                valid = False
                heads = {}
            if not valid or values.get("signer") != self.report.checkpoint_key_sha256:
                self.problem(f"{name}: the signature does not verify (edited or forged)")
                continue
            self.report.checkpoints += 1
            for table, chains in heads.items():
                for chain, (seq, entry_hash) in chains.items():
                    self.marks.setdefault((table, chain), {}).setdefault(int(seq), []).append(
                        (int(values["id"]), str(entry_hash))
                    )

    # 5. Each chain segment links entry to entry, every checkpointed head in it matches, every row is in the
    # range, and every token verifies and matches its row.
    def step5_chain(self, table: str, anchors: list[x509.Certificate], others: list[x509.Certificate]) -> None:
        from_us, to_us = int(self.manifest.get("from_us", 0)), int(self.manifest.get("to_us", 0))
        hasher = _HASHERS[table]
        current: _Segment | None = None
        pending_signed = 0
        count = 0
        for number, values in self._lines(f"{table}.jsonl"):
            count += 1
            row = _decode_row(table, values)
            name = _row_name(table, number, row)
            at = row.get(_TIME_COLUMN[table])
            if not isinstance(at, int) or not from_us <= at < to_us:
                self.problem(f"{name}: its time {at} is outside the archive's range")
            if table == "tokens":
                self._check_token(name, row, anchors, others)
            chain, seq = row.get("chain"), row.get("seq")
            if chain is None:
                continue
            if not isinstance(seq, int):
                self.problem(f"{name}: no seq")
                continue
            try:
                recomputed = hasher(row["prev_hash"], chain, seq, row)
            except (KeyError, TypeError, ValueError, AttributeError):
                self.problem(f"{name}: not a complete {table} row")
                continue
            if recomputed != row["entry_hash"]:
                self.problem(f"{name}: edited (its fields no longer hash to its entry hash)")
            if current is not None and (current.chain, current.last_seq + 1) == (chain, seq):
                if row["prev_hash"].hex() != current.entry_hash:
                    self.problem(f"{name}: does not link to seq {current.last_seq} of its chain")
                current.last_seq = seq
                current.entry_hash = row["entry_hash"].hex()
            else:
                if current is not None and current.chain == chain and seq <= current.last_seq:
                    self.problem(f"{name}: out of order or duplicated (after seq {current.last_seq})")
                self.report.signed_entries += pending_signed
                pending_signed = 0
                current = _Segment(table, chain, seq, row["prev_hash"].hex(), seq, row["entry_hash"].hex())
                self.segments.append(current)
                if seq == 1 and row["prev_hash"] != GENESIS:
                    self.problem(f"{name}: seq 1 does not follow the genesis hash")
                for _, signed_hash in self.marks.get((table, chain), {}).get(seq - 1, []):
                    if signed_hash != current.prev_hash:
                        self.problem(f"{name}: its prev_hash differs from the checkpointed head of seq {seq - 1}")
            pending_signed += 1
            for checkpoint, signed_hash in self.marks.get((table, chain), {}).get(seq, []):
                if signed_hash != current.entry_hash:
                    self.problem(f"{name}: differs from checkpoint {checkpoint} (the chain was rewritten)")
                else:
                    self.report.signed_entries += pending_signed
                    pending_signed = 0
        if count != self.report.counts.get(table):
            self.problem(f"{table}.jsonl: {count} rows, the manifest says {self.report.counts.get(table)}")

    def _check_token(
        self, name: str, row: Mapping[str, Any], anchors: list[x509.Certificate], others: list[x509.Certificate]
    ) -> None:
        blob = row.get("token")
        if not isinstance(blob, bytes):
            self.problem(f"{name}: no token")
            return
        try:
            token = read_token(blob) if is_bare_token(blob) else read_response(blob).token
            nonce = None if row.get("nonce") is None else int(row["nonce"])
            verified = verify_timestamp(
                blob,
                digest=row.get("imprint"),
                anchors=anchors,
                extra_certs=others,
                policy=row.get("policy"),
                nonce=nonce,
            )
        except (ParseError, VerificationError, ValueError, TypeError) as e:
            self.problem(f"{name}: not a readable token: {e}")
            return
        if token is None or not verified.ok:
            failed = verified.failures[0] if verified.failures else None
            reason = f"{failed.name}: {failed.detail}" if failed else "not every required check passed"
            self.problem(f"{name}: the token does not verify ({reason})")
            return
        tst = token.tst_info
        gen_us = (tst.gen_time - _EPOCH) // timedelta(microseconds=1)
        mismatches = [
            what
            for what, same in (
                ("serial", format(tst.serial, "x") == row.get("serial")),
                ("genTime", gen_us == row.get("gen_time_us")),
                ("hash algorithm", tst.hash_oid == row.get("hash_oid")),
            )
            if not same
        ]
        if mismatches:
            self.problem(f"{name}: the token's {', '.join(mismatches)} differ from its row")

    # 6. The segments found are the ones segments.json records (nothing dropped or added at their ends).
    def step6_segments(self) -> None:
        try:
            recorded = json.loads(self.archive.read("segments.json"))
        except (KeyError, ValueError) as e:
            self.problem(f"segments.json: missing or not JSON ({e})")
            return
        found = [s.as_dict() for s in self.segments]
        self.report.segments = len(found)
        if found != recorded:
            for mine, theirs in zip([*found, None], [*recorded, None], strict=False):
                if mine != theirs:
                    self.problem(f"segments.json: records {_segment_text(theirs)}, the rows form {_segment_text(mine)}")
                    return

    def _lines(self, member: str) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            f = self.archive.open(member)
        except KeyError:
            self.problem(f"{member}: missing")
            return
        with io.TextIOWrapper(f, encoding="utf-8") as text:
            for number, line in enumerate(text, 1):
                try:
                    values = json.loads(line)
                except ValueError:
                    self.problem(f"{member} line {number}: not JSON")
                    continue
                if isinstance(values, dict):
                    yield number, values
                else:
                    self.problem(f"{member} line {number}: not a JSON object")


def _row_name(table: str, number: int, row: Mapping[str, Any]) -> str:
    ident = f"serial 0x{row.get('serial')}" if table == "tokens" else f"event {row.get('kind')}"
    return f"{table}.jsonl line {number} ({table} chain {row.get('chain')} seq {row.get('seq')}, {ident})"


def _segment_text(segment: Mapping[str, Any] | None) -> str:
    if segment is None:
        return "nothing more"
    return f"{segment['table']} chain {segment['chain']} seq {segment['first_seq']}-{segment['last_seq']}"
