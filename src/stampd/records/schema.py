"""The records' tables, shared by every SQL store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData()


def _chain_columns() -> list[Column[Any]]:
    """The hash chain of a records table (stampd.records.chain); NULL in the rows recorded before revision 0002."""
    return [
        Column("chain", String(64), comment="the chain id: one per process that opened the records"),
        Column("seq", BigInteger, comment="1, 2, 3... within the chain"),
        Column("prev_hash", LargeBinary, comment="entry_hash of seq - 1; 32 zero bytes for seq 1"),
        Column("entry_hash", LargeBinary, comment="SHA-256(prev_hash || the row's canonical fields)"),
    ]


tokens = Table(
    "tokens",
    metadata,
    Column("serial", String(40), primary_key=True, comment="lowercase hexadecimal, no leading zeros"),
    Column("gen_time", String(32), nullable=False, comment="the token's GeneralizedTime, as encoded"),
    Column("gen_time_us", BigInteger, nullable=False, comment="genTime in microseconds since the epoch"),
    Column("tsu", String(64), nullable=False),
    Column("policy", String(256), nullable=False),
    Column("hash_oid", String(64), nullable=False),
    Column("imprint", LargeBinary, nullable=False),
    Column("nonce", Text, comment="decimal"),
    Column("requester", String(64)),
    Column("token", LargeBinary, nullable=False, comment="the DER TimeStampResp as returned"),
    *_chain_columns(),
    Column("subscriber", String(64), comment="the subscriber granted the token (revision 0003); NULL if anonymous"),
    Index("ix_tokens_imprint", "imprint"),
    Index("ix_tokens_gen_time_us", "gen_time_us"),
    Index("uq_tokens_chain_seq", "chain", "seq", unique=True),
    Index("ix_tokens_subscriber_gen_time_us", "subscriber", "gen_time_us"),
)

tsu_states = Table(
    "tsu_states",
    metadata,
    Column("tsu", String(64), primary_key=True),
    Column("state", String(16), nullable=False, comment="compromised or terminated; a TSU without a row is active"),
    Column("since_us", BigInteger, comment="compromise: the earliest time the key may have been misused"),
    Column("at_us", BigInteger, nullable=False, comment="when the state was recorded"),
    Column("reason", Text),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("tsu", String(64)),
    Column("detail", Text, nullable=False, comment="JSON"),
    *_chain_columns(),
    Index("uq_events_chain_seq", "chain", "seq", unique=True),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("heads", Text, nullable=False, comment="JSON: table -> chain -> [seq, entry_hash hex], as signed"),
    Column("signature", LargeBinary, nullable=False),
    Column("signer", String(64), nullable=False, comment="hex SHA-256 of the signer's SubjectPublicKeyInfo"),
)

subscribers = Table(
    "subscribers",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("enabled", Boolean, nullable=False),
    Column("networks", Text, nullable=False, comment="JSON: the IP networks (CIDR) that identify it"),
    Column("token_sha256", LargeBinary, comment="SHA-256 of its API token; the token itself is never stored"),
    Column("basic_user", String(256)),
    Column("basic_hash", Text, comment="scrypt$n$r$p$salt$hash of its basic password"),
    Column("cert_sha256", Text, nullable=False, comment="JSON: hex SHA-256 of its client certificates"),
    Column("quotas", Text, nullable=False, comment='JSON: ["N/PERIOD", ...], at most one per period'),
    Column("rate_per_s", Integer),
    Column("tsus", Text, comment="JSON: the TSUs it may use; NULL for every TSU that serves subscribers"),
    Column("created_at_us", BigInteger, nullable=False),
    Index("uq_subscribers_token_sha256", "token_sha256", unique=True),
    Index("uq_subscribers_basic_user", "basic_user", unique=True),
)

usage_counters = Table(
    "usage_counters",
    metadata,
    Column("subscriber", String(64), nullable=False),
    Column("window", String(32), nullable=False, comment="day:2026-11-21, month:2026-11, total, s:<epoch second>..."),
    Column("count", BigInteger, nullable=False, comment="tokens granted (or reserved) in the window"),
    PrimaryKeyConstraint("subscriber", "window"),
)
