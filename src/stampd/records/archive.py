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
- ``checkpoints.jsonl``: every checkpoint of the archive's checkpoint key that signed an entry in a segment (or the
  entry just before one);
- ``checkpoint-key.pem``: the checkpoint key's public key; ``certs/...pem``: each TSU's certificates and chain,
  and its trust anchor.

:func:`verify_archive` checks, in order: that no member appears twice, the manifest and its signature, every
member's hash, the checkpoints' signatures, the rows' order (chain, then seq), each segment's hash chain and its
boundaries, every checkpointed head that falls in a segment, and every token with
:func:`stampd.verify.verify_timestamp` (chain to the archived trust anchors at genTime) and against its row (serial,
genTime, imprint, hash algorithm, policy, nonce). A corrupt or malformed file is a named problem, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeGuard

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import LargeBinary, Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from stampd.der.token_reader import is_bare_token, read_response, read_token
from stampd.errors import ParseError, RecordingError, VerificationError
from stampd.records.chain import GENESIS
from stampd.records.checkpoint import PublicKey, load_public_key, signature_valid, signed_bytes, spki_sha256
from stampd.records.maintenance import (
    CHAINED_TABLES,
    ENTRY_HASHERS,
    STREAM_ROWS,
    TIME_COLUMN,
    Findings,
    open_at_head,
)
from stampd.records.retention import CheckpointKey
from stampd.records.schema import checkpoints
from stampd.verify import verify_timestamp

ARCHIVE_FORMAT = "stampd-archive-v1"
MANIFEST = "manifest.json"
MANIFEST_SIGNATURE = "manifest.sig"
CHECKPOINT_KEY_MEMBER = "checkpoint-key.pem"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _binary_columns(table: Table) -> frozenset[str]:
    return frozenset(c.name for c in table.columns if isinstance(c.type, LargeBinary))


_BINARY = {name: _binary_columns(table) for name, table in CHAINED_TABLES.items()}


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


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What to archive: the rows of ``[from_us, to_us)``, these certificates, signed with ``checkpoint`` (None:
    unsigned), the manifest dated ``now_us``."""

    from_us: int
    to_us: int
    certificates: list[ArchiveCertificate]
    checkpoint: CheckpointKey | None
    now_us: int


def export_archive(url: str, target: Path, request: ExportRequest) -> ExportSummary:
    """Write the archive to ``target`` atomically: a temporary file in the same directory, linked into place only
    when complete; an existing ``target`` is never replaced."""
    if target.exists():
        raise RecordingError(f"{target} exists: an archive is never overwritten")
    engine = open_at_head(url, "export")
    temporary: str | None = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            summary = _write(engine, archive, request)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temporary, 0o644)  # an archive holds no secret; it is meant to be handed over
        os.link(temporary, target)  # fails if target appeared meanwhile: nothing is ever replaced
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot read the records: {e}") from e
    except OSError as e:  # no such directory, a full disk, a target that appeared meanwhile
        raise RecordingError(f"cannot write the archive {target}: {e.strerror or e}") from e
    finally:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        engine.dispose()
    return summary


def _write(engine: Engine, archive: zipfile.ZipFile, request: ExportRequest) -> ExportSummary:
    from_us, to_us, certificates, checkpoint = request.from_us, request.to_us, request.certificates, request.checkpoint
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
        for name, table in CHAINED_TABLES.items():
            time_column = table.c[TIME_COLUMN[name]]
            query = (
                select(table)
                .where(time_column >= from_us, time_column < to_us)
                .order_by(table.c.chain.asc().nulls_first(), table.c.seq, time_column)
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
        # Only the checkpoints of the key that signs the archive: one of an earlier checkpoint key could not be
        # checked offline (its public key is not known here).
        signer = None if checkpoint is None else checkpoint.signer.key_id
        with member_writer("checkpoints.jsonl") as out:
            for row in conn.execute(select(checkpoints).order_by(checkpoints.c.id)):
                if row.signer == signer and _covers(json.loads(row.heads), segments):
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
        "created": iso(request.now_us),
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
class ArchiveReport(Findings):
    """What `stampd records verify-archive` found; ``problems[0]`` is the first bad item."""

    counts: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    checkpoints: int = 0
    signed_entries: int = 0
    """Entries at or before a checkpointed head in their segment: covered by a checkpoint signature."""
    manifest_signed: bool = False
    checkpoint_key_sha256: str | None = None
    range: tuple[str, str] | None = None

    def details(self) -> dict[str, Any]:
        return {
            "range": list(self.range) if self.range else None,
            "counts": self.counts,
            "segments": self.segments,
            "checkpoints": self.checkpoints,
            "signed_entries": self.signed_entries,
            "manifest_signed": self.manifest_signed,
            "checkpoint_key_sha256": self.checkpoint_key_sha256,
        }


class _Bad(Exception):
    """Stops the verification at an item that makes the rest meaningless (the manifest, a member's hash)."""


_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
)
"""What reading a corrupt ZIP raises: a bad header or CRC, a broken deflate stream, a truncated file, an unknown
compression method or ZIP version, an encrypted member."""

_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError)
"""What a well-formed ZIP whose members are not what they claim may still raise somewhere (a manifest field of
another type, a row that is not a row): the archive is bad, never the verifier's crash."""


def verify_archive(path: Path, *, pinned_key: PublicKey | None = None) -> ArchiveReport:
    """Check the archive at ``path`` offline (see the module docstring). ``pinned_key``: the checkpoint key the
    archive must be signed with (the archive's own key proves nothing by itself). Never raises for a bad file."""
    report = ArchiveReport()
    verification: _Verification | None = None
    try:
        with zipfile.ZipFile(path) as archive:
            verification = _Verification(archive, report, pinned_key)
            verification.run()
    except _Bad as e:
        report.problems.insert(0, str(e))
    except _UNREADABLE as e:
        where = f"{path}" if verification is None else f"{path}: {verification.reading}"
        report.problems.insert(0, f"{where}: not a readable archive: {type(e).__name__}: {e}")
    except _MALFORMED as e:
        where = "the archive" if verification is None else verification.reading
        report.problems.insert(0, f"{where}: malformed ({type(e).__name__}: {e})")
    return report


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest(manifest: Any) -> None:
    """The manifest's fields have the types the verification reads them as; else _Bad naming the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise _Bad(f"{MANIFEST}: not a {ARCHIVE_FORMAT} manifest")
    members = manifest.get("members")
    well_formed = {
        "members": isinstance(members, dict)
        and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and _is_int(v.get("size"))
            for v in members.values()
        ),
        "counts": isinstance(manifest.get("counts"), dict) and all(_is_int(v) for v in manifest["counts"].values()),
        "from_us": _is_int(manifest.get("from_us")),
        "to_us": _is_int(manifest.get("to_us")),
        "trust_anchors": _is_str_list(manifest.get("trust_anchors")),
        "certificates": _is_str_list(manifest.get("certificates")),
        "checkpoint_key_sha256": manifest.get("checkpoint_key_sha256") is None
        or isinstance(manifest.get("checkpoint_key_sha256"), str),
    }
    for name, good in well_formed.items():
        if not good:
            raise _Bad(f"{MANIFEST}: {name} is missing or not of the expected type")


def _heads(text: Any) -> dict[str, dict[str, tuple[int, str]]]:
    """A checkpoint's signed heads, ``table -> chain -> (seq, entry hash hex)``; ValueError if malformed."""
    heads = json.loads(text) if isinstance(text, str) else None
    if not isinstance(heads, dict):
        raise ValueError("heads is not a JSON object")
    parsed: dict[str, dict[str, tuple[int, str]]] = {}
    for table, chains in heads.items():
        if not isinstance(chains, dict):
            raise ValueError(f"heads of {table} are not an object")
        for chain, mark in chains.items():
            if not (isinstance(mark, list) and len(mark) == 2 and _is_int(mark[0]) and isinstance(mark[1], str)):
                raise ValueError(f"the {table} head of chain {chain} is not [seq, entry hash]")
            parsed.setdefault(table, {})[chain] = (mark[0], mark[1])
    return parsed


class _Verification:
    def __init__(self, archive: zipfile.ZipFile, report: ArchiveReport, pinned_key: PublicKey | None) -> None:
        self.archive = archive
        self.report = report
        self.pinned_key = pinned_key
        self.manifest: dict[str, Any] = {}
        self.key: PublicKey | None = None
        self.marks: dict[tuple[str, str], dict[int, list[tuple[int, str]]]] = {}
        self.segments: list[_Segment] = []
        self.reading = MANIFEST
        """The member being read, named when it turns out unreadable."""

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def read(self, member: str) -> bytes:
        self.reading = member
        return self.archive.read(member)

    def run(self) -> None:
        self.step1_manifest()
        self.step2_members()
        anchors, others = self.step3_certificates()
        self.step4_checkpoints()
        for table in CHAINED_TABLES:  # the order export writes them in, so segments compare in order
            self.step5_chain(table, anchors, others)
        self.step6_segments()

    # 1. Each member once, the manifest, its format and (with a checkpoint key) its signature.
    def step1_manifest(self) -> None:
        names = self.archive.namelist()
        seen: set[str] = set()
        for name in names:
            if name in seen:  # readers differ on which copy they take: the archive must mean one thing
                raise _Bad(f"{name}: appears twice in the archive")
            seen.add(name)
        try:
            data = self.read(MANIFEST)
            manifest = json.loads(data)
        except (KeyError, ValueError) as e:
            raise _Bad(f"{MANIFEST}: missing or not JSON ({e})") from e
        _check_manifest(manifest)
        self.manifest = manifest
        self.report.range = (str(manifest.get("from")), str(manifest.get("to")))
        self.report.counts = dict(manifest["counts"])
        key_id = manifest["checkpoint_key_sha256"]
        if key_id is not None:
            try:
                self.key = load_public_key(self.read(CHECKPOINT_KEY_MEMBER))
            except (KeyError, ValueError) as e:
                raise _Bad(f"{CHECKPOINT_KEY_MEMBER}: missing or not a public key ({e})") from e
            if spki_sha256(self.key) != key_id:
                raise _Bad(f"{CHECKPOINT_KEY_MEMBER}: not the key the manifest names ({key_id})")
            self.report.checkpoint_key_sha256 = key_id
        if self.pinned_key is not None and (key_id is None or key_id != spki_sha256(self.pinned_key)):
            raise _Bad(f"{MANIFEST}: not signed by the given checkpoint key (archive key: {key_id or 'none'})")
        if MANIFEST_SIGNATURE in seen or key_id is not None:
            if self.key is None or MANIFEST_SIGNATURE not in seen:
                raise _Bad(f"{MANIFEST_SIGNATURE}: the manifest signature or its key is missing")
            if not signature_valid(self.key, data, self.read(MANIFEST_SIGNATURE)):
                raise _Bad(f"{MANIFEST_SIGNATURE}: the signature over {MANIFEST} does not verify (edited or forged)")
            self.report.manifest_signed = True

    # 2. Every member is listed, and its SHA-256 and size match.
    def step2_members(self) -> None:
        listed: dict[str, Any] = self.manifest["members"]
        present = set(self.archive.namelist()) - {MANIFEST, MANIFEST_SIGNATURE}
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise _Bad(f"{unlisted[0]}: a member the manifest does not list")
        for name, expected in sorted(listed.items()):
            if name not in present:
                raise _Bad(f"{name}: listed in the manifest but missing from the archive")
            digest = hashlib.sha256()
            size = 0
            self.reading = name
            with self.archive.open(name) as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
            if digest.hexdigest() != expected["sha256"] or size != expected["size"]:
                raise _Bad(f"{name}: its SHA-256 or size is not the manifest's (the member was altered)")

    # 3. The certificates: trust anchors and the others (TSU certificates, intermediates).
    def step3_certificates(self) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        loaded: dict[str, list[x509.Certificate]] = {"trust_anchors": [], "certificates": []}
        for role, certificates in loaded.items():
            for name in self.manifest[role]:
                try:
                    certificates.extend(x509.load_pem_x509_certificates(self.read(name)))
                except (KeyError, ValueError) as e:
                    self.problem(f"{name}: no readable certificate ({e})")
        if not loaded["trust_anchors"]:
            self.problem(f"{MANIFEST}: no trust anchor: the tokens cannot be verified")
        return loaded["trust_anchors"], loaded["certificates"]

    # 4. The checkpoints' signatures, by the archive's checkpoint key; the heads they signed are compared with the
    # entries in step 5.
    def step4_checkpoints(self) -> None:
        for number, values in self._lines("checkpoints.jsonl"):
            name = f"checkpoints.jsonl line {number} (checkpoint {values.get('id')})"
            if self.key is None:
                self.problem(f"{name}: the archive has no checkpoint key to check it with")
                return
            if values.get("signer") != self.report.checkpoint_key_sha256:
                self.problem(f"{name}: signed by another key (SPKI SHA-256 {values.get('signer')}), not the archive's")
                continue
            try:
                heads = _heads(values["heads"])
                document = json.loads(values["heads"])
                valid = _is_int(values["id"]) and signature_valid(
                    self.key, signed_bytes(int(values["at_us"]), document), bytes.fromhex(values["signature"])
                )
            except (KeyError, ValueError, TypeError):
                valid = False
            if not valid:
                self.problem(f"{name}: the signature does not verify (edited or forged)")
                continue
            self.report.checkpoints += 1
            for table, chains in heads.items():
                for chain, (seq, entry_hash) in chains.items():
                    self.marks.setdefault((table, chain), {}).setdefault(seq, []).append((values["id"], entry_hash))

    # 5. The rows are in order (chain, then seq), each chain segment links entry to entry, every checkpointed head
    # in it matches, every row is in the range, and every token verifies and matches its row.
    def step5_chain(self, table: str, anchors: list[x509.Certificate], others: list[x509.Certificate]) -> None:
        from_us, to_us = self.manifest["from_us"], self.manifest["to_us"]
        hasher = ENTRY_HASHERS[table]
        current: _Segment | None = None
        previous: tuple[str, int] | None = None
        pending_signed = 0
        count = 0
        for number, values in self._lines(f"{table}.jsonl"):
            count += 1
            try:
                row = _decode_row(table, values)
            except ValueError:
                self.problem(f"{table}.jsonl line {number}: a binary column is not hexadecimal")
                continue
            name = _row_name(table, number, row)
            at = row.get(TIME_COLUMN[table])
            if not _is_int(at) or not from_us <= at < to_us:
                self.problem(f"{name}: its time {at} is outside the archive's range")
            if table == "tokens":
                self._check_token(name, row, anchors, others)
            chain, seq = row.get("chain"), row.get("seq")
            if chain is None:
                if previous is not None:
                    self.problem(f"{name}: an unchained row after the chained ones (rows out of order)")
                continue
            if not isinstance(chain, str) or not _is_int(seq):
                self.problem(f"{name}: no chain or seq")
                continue
            if previous is not None and (chain, seq) <= previous:
                after = f"{table} chain {previous[0]} seq {previous[1]}"
                self.problem(f"{name}: out of order or duplicated (after {after})")
                continue
            previous = (chain, seq)
            try:
                recomputed = hasher(row["prev_hash"], chain, seq, row)
                linked = row["prev_hash"].hex()
                entry_hash = row["entry_hash"].hex()
            except (KeyError, TypeError, ValueError, AttributeError):
                self.problem(f"{name}: not a complete {table} row")
                continue
            if recomputed != row["entry_hash"]:
                self.problem(f"{name}: edited (its fields no longer hash to its entry hash)")
            if current is not None and (current.chain, current.last_seq + 1) == (chain, seq):
                if linked != current.entry_hash:
                    self.problem(f"{name}: does not link to seq {current.last_seq} of its chain")
                current.last_seq = seq
                current.entry_hash = entry_hash
            else:
                self.report.signed_entries += pending_signed
                pending_signed = 0
                current = _Segment(table, chain, seq, linked, seq, entry_hash)
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
        blob, imprint, nonce = row.get("token"), row.get("imprint"), row.get("nonce")
        if not isinstance(blob, bytes) or not isinstance(imprint, bytes):
            self.problem(f"{name}: no token or imprint")
            return
        try:
            token = read_token(blob) if is_bare_token(blob) else read_response(blob).token
            expected_nonce = None if nonce is None else int(nonce)
            verified = verify_timestamp(
                blob,
                digest=imprint,
                anchors=anchors,
                extra_certs=others,
                policy=row.get("policy"),
                nonce=expected_nonce,
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
                ("imprint", tst.digest == imprint),
                ("policy", tst.policy == row.get("policy")),
                ("nonce", tst.nonce == expected_nonce),
            )
            if not same
        ]
        if mismatches:
            self.problem(f"{name}: the token's {', '.join(mismatches)} differ from its row")

    # 6. The segments found are the ones segments.json records (nothing dropped or added at their ends).
    def step6_segments(self) -> None:
        try:
            recorded = json.loads(self.read("segments.json"))
        except (KeyError, ValueError) as e:
            self.problem(f"segments.json: missing or not JSON ({e})")
            return
        found = [s.as_dict() for s in self.segments]
        self.report.segments = len(found)
        if not isinstance(recorded, list) or not all(isinstance(s, dict) for s in recorded):
            self.problem("segments.json: not a list of segments")
        elif found != recorded:
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
        self.reading = member
        with f:
            for number, line in enumerate(f, 1):
                try:
                    values = json.loads(line.decode("utf-8"))
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
    return (
        f"{segment.get('table')} chain {segment.get('chain')} seq {segment.get('first_seq')}-{segment.get('last_seq')}"
    )
