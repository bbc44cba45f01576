"""Records for the tests: a fresh PostgreSQL database per test, and many chained token rows written straight into
a SQLite records file (a purge of a big TSA's records without issuing its tokens one by one).

Import it as ``from recordstools import ...`` with ``tests/`` on ``sys.path`` (as the clock tests do with clocktools).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from stampd.records.chain import GENESIS, token_entry_hash

ADMIN_URL = os.environ.get("STAMPD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
"""The server's maintenance database: each test's own database is created and dropped through it."""


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards (even while connections remain)."""
    name = f"stampd_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    user, host, port = base.get("user", "postgres"), base.get("host", "127.0.0.1"), base.get("port", 5432)
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def chained_tokens(chain: str, gen_times_us: list[int], first_serial: int = 1) -> Iterator[dict[str, Any]]:
    """Token rows forming seq 1, 2, ... of ``chain`` with these genTimes, hashed as the store hashes them."""
    prev = GENESIS
    for seq, gen_time_us in enumerate(gen_times_us, 1):
        serial = first_serial + seq - 1
        row: dict[str, Any] = {
            "serial": format(serial, "x"),
            "gen_time": "20260101000000Z",
            "gen_time_us": gen_time_us,
            "tsu": "default",
            "policy": "2.25.7",
            "hash_oid": "2.16.840.1.101.3.4.2.1",
            "imprint": serial.to_bytes(32, "big"),
            "nonce": None,
            "requester": None,
            "token": b"\x30\x03" + serial.to_bytes(8, "big"),
            "subscriber": None,
        }
        entry = token_entry_hash(prev, chain, seq, row)
        row.update(chain=chain, seq=seq, prev_hash=prev, entry_hash=entry)
        prev = entry
        yield row


def insert_tokens(database: Path, rows: Iterator[dict[str, Any]]) -> int:
    """Write token rows into a SQLite records file in one transaction; returns how many."""
    columns = (
        "serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, nonce, requester, token, subscriber, "
        "chain, seq, prev_hash, entry_hash"
    )
    names = [c.strip() for c in columns.split(",")]
    values = [tuple(row[n] for n in names) for row in rows]
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.executemany(f"INSERT INTO tokens ({columns}) VALUES ({', '.join('?' * len(names))})", values)
    return len(values)
