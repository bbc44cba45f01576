"""The records' tables, shared by every SQL store."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

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
    Index("ix_tokens_imprint", "imprint"),
    Index("ix_tokens_gen_time_us", "gen_time_us"),
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
)
