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

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("tsu", String(64)),
    Column("detail", Text, nullable=False, comment="JSON"),
)
