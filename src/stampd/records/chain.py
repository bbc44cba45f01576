"""Hash chains over the records: every token and every event commits to the hash of the entry before it in its
chain, so that an edit, deletion, insertion or reordering anywhere breaks the chain (RFC 3628 §7.4.8: records
protected against modification; issue "Evidence that scales").

Each :class:`~stampd.records.store.RecordStore` (one per serving process) writes chains of its own, named by a
chain id made when it opens: no coordination between processes or nodes is needed on the request path. An
entry's hash is ``SHA-256(prev_hash || label || canonical fields)``, where the canonical fields are an unambiguous
length-prefixed encoding of every recorded field plus the chain id and the sequence number; the first entry of a
chain (seq 1) follows :data:`GENESIS`, 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
from collections.abc import Mapping
from typing import Any

GENESIS = bytes(32)
"""prev_hash of seq 1."""

TOKEN_FIELDS = (
    "serial",
    "gen_time",
    "gen_time_us",
    "tsu",
    "policy",
    "hash_oid",
    "imprint",
    "nonce",
    "requester",
    "token",
    "subscriber",
)
"""The columns of a token record that its entry hash covers, in the order they are encoded; ``subscriber`` only
when it is set (see :func:`token_entry_hash`)."""

EVENT_FIELDS = ("at_us", "kind", "tsu", "detail")
"""The columns of an event that its entry hash covers, in the order they are encoded."""

TOKENS_LABEL = b"stampd/records/tokens/v1\x00"
EVENTS_LABEL = b"stampd/records/events/v1\x00"
"""Domain separation: a token entry can never hash like an event entry."""

CHAIN_ID_MAX = 64
_NONE = b"\xff\xff\xff\xff"
"""An absent value: a length no encoded field can have (fields are far below 4 GiB)."""

_length = struct.Struct(">I").pack
_integer = struct.Struct(">q").pack
_sha256 = hashlib.sha256


def new_chain_id() -> str:
    """``<host>-<pid>-<8 random hex digits>``: unique to one opening of the records by one process."""
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"[:CHAIN_ID_MAX]


def _text(value: str | None) -> bytes:
    """A text field: a 4-byte big-endian length then its UTF-8, or the absent marker."""
    if value is None:
        return _NONE
    data = value.encode("utf-8")
    return _length(len(data)) + data


def _binary(value: bytes) -> bytes:
    """A binary field: a 4-byte big-endian length then the bytes."""
    return _length(len(value)) + value


# Each position holds one type (text, binary or an 8-byte signed big-endian integer) and every variable-length
# field is length-prefixed, so the encoding is unambiguous. Written out field by field: one token costs about
# 3 µs, most of it the SHA-256 of the token itself.


def token_entry_hash(prev_hash: bytes, chain: str, seq: int, row: Mapping[str, Any]) -> bytes:
    """The entry hash of a token row (the columns of :data:`TOKEN_FIELDS`) at ``seq`` of ``chain``.

    The subscriber is appended only when the row has one: the entries of tokens without a subscriber (every token
    recorded before subscribers existed, and every token of a public TSU) hash exactly as they always did, so
    existing chains stay valid. The token field before it is length-prefixed, so the encoding stays unambiguous.
    """
    subscriber = row.get("subscriber")
    return _sha256(
        b"".join(
            (
                prev_hash,
                TOKENS_LABEL,
                _text(chain),
                _integer(seq),
                _text(row["serial"]),
                _text(row["gen_time"]),
                _integer(row["gen_time_us"]),
                _text(row["tsu"]),
                _text(row["policy"]),
                _text(row["hash_oid"]),
                _binary(row["imprint"]),
                _text(row["nonce"]),
                _text(row["requester"]),
                _binary(row["token"]),
                b"" if subscriber is None else _text(subscriber),
            )
        )
    ).digest()


def event_entry_hash(prev_hash: bytes, chain: str, seq: int, row: Mapping[str, Any]) -> bytes:
    """The entry hash of an event row (the columns of :data:`EVENT_FIELDS`) at ``seq`` of ``chain``."""
    return _sha256(
        b"".join(
            (
                prev_hash,
                EVENTS_LABEL,
                _text(chain),
                _integer(seq),
                _integer(row["at_us"]),
                _text(row["kind"]),
                _text(row["tsu"]),
                _text(row["detail"]),
            )
        )
    ).digest()


class ChainHead:
    """The last committed entry of one chain: it advances only when a row has committed."""

    __slots__ = ("chain", "entry_hash", "seq")

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self.seq = 0
        self.entry_hash = GENESIS

    def advance(self, seq: int, entry: bytes) -> None:
        assert seq > self.seq, "a chain head never moves back"
        self.seq = seq
        self.entry_hash = entry

    def as_json(self) -> list[Any]:
        """``[seq, entry_hash hex]``, as a checkpoint signs it."""
        return [self.seq, self.entry_hash.hex()]
