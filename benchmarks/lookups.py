"""Look-ups in a large records database: `stampd tokens show` (by serial) and `stampd tokens find` (by imprint)
must stay fast at 10 million tokens (issue "Evidence that scales", item 4; SPEC OPS-09).

It fills a SQLite records database (schema from the shipped migrations, so the real indexes) with N synthetic
token rows, quickly: ``executemany`` in large transactions with the journal and fsync off, which is fine for
benchmark data and nothing else. Then it times look-ups through ``RecordStore`` exactly as the commands do:
existing serials, absent serials and existing imprints, each chosen at random over the whole table.

Usage: ``python benchmarks/lookups.py --rows 10000000 [--db FILE] [--lookups 2000] [--json FILE]``. An existing
``--db`` with at least ``--rows`` tokens is reused (the fill of 10 million rows takes minutes).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore

FILL_TRANSACTION_ROWS = 200_000
TOKEN_BYTES = 96
"""Synthetic tokens are random bytes of this size: the look-ups never read them beyond the row."""
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
SHA256_OID = "2.16.840.1.101.3.4.2.1"


def _serial(rng: random.Random) -> int:
    """Like RandomSerialSource: 127 random bits, never zero."""
    return rng.getrandbits(127) | 1


def _imprint(index: int) -> bytes:
    """Deterministic per row, so that a look-up can pick the imprint of any row without storing them all."""
    return random.Random(index * 2 + 1).randbytes(32)


def fill(path: Path, rows: int, seed: int) -> tuple[list[int], float]:
    """Insert ``rows`` token rows; returns a sample of their serials and the seconds taken."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-4000000")  # 4 GB of page cache: index inserts stay in memory
    rng = random.Random(seed)
    sample: list[int] = []
    insert = (
        "INSERT INTO tokens (serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, nonce, requester, "
        "token, chain, seq, prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    started = time.perf_counter()
    prev = bytes(32)
    done = 0
    while done < rows:
        batch = []
        for i in range(done, min(rows, done + FILL_TRANSACTION_ROWS)):
            serial = _serial(rng)
            if rng.random() < 0.001:
                sample.append(serial)
            gen_us = START_US + i * 5_000  # 200 tokens/s
            entry = rng.randbytes(32)
            gen_time = time.strftime("%Y%m%d%H%M%S", time.gmtime(gen_us // 1_000_000)) + "Z"
            batch.append(
                (
                    format(serial, "x"),
                    gen_time,
                    gen_us,
                    "default",
                    "2.25.7",
                    SHA256_OID,
                    _imprint(i),
                    str(rng.getrandbits(63)),
                    None,
                    rng.randbytes(TOKEN_BYTES),
                    "bench",
                    i + 1,
                    prev,
                    entry,
                )
            )
            prev = entry
        conn.execute("BEGIN")
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
        done += len(batch)
        elapsed = time.perf_counter() - started
        print(f"  {done:>11,} rows  {elapsed:7.1f} s  ({done / elapsed:,.0f} rows/s)", file=sys.stderr, flush=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return sample, time.perf_counter() - started


def _timings(values_ns: list[int]) -> dict[str, float]:
    ordered = sorted(values_ns)
    return {
        "count": len(ordered),
        "median_ms": statistics.median(ordered) / 1e6,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
        "max_ms": ordered[-1] / 1e6,
    }


def measure(url: str, serials: list[int], rows: int, lookups: int, seed: int) -> dict[str, Any]:
    """Time RecordStore.token_by_serial (present and absent) and tokens_by_imprint, one call each."""
    rng = random.Random(seed + 1)
    store = RecordStore(url, create=False)
    try:
        present, absent, by_imprint = [], [], []
        for _ in range(lookups):
            serial = rng.choice(serials)
            t = time.perf_counter_ns()
            found = store.token_by_serial(serial)
            present.append(time.perf_counter_ns() - t)
            assert found is not None and found.serial == serial

            t = time.perf_counter_ns()
            missing = store.token_by_serial(_serial(rng) | (1 << 127))  # 128 bits: never issued here
            absent.append(time.perf_counter_ns() - t)
            assert missing is None

            index = rng.randrange(rows)
            t = time.perf_counter_ns()
            matches = store.tokens_by_imprint(_imprint(index))
            by_imprint.append(time.perf_counter_ns() - t)
            assert [m.gen_time_ns for m in matches] == [(START_US + index * 5_000) * 1000]
    finally:
        store.close()
    return {
        "token_by_serial": _timings(present),
        "token_by_serial_absent": _timings(absent),
        "tokens_by_imprint": _timings(by_imprint),
    }


def _existing(path: Path, rows: int) -> list[int] | None:
    """A sample of serials of an existing database that already holds ``rows`` tokens, else None."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path)
    try:
        count = conn.execute("SELECT max(seq) FROM tokens").fetchone()[0] or 0
        if count < rows:
            return None
        picked = conn.execute("SELECT serial FROM tokens WHERE seq % 1000 = 7").fetchall()
    finally:
        conn.close()
    return [int(s, 16) for (s,) in picked]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="The SQLite file to fill (default: a temporary file, removed).")
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    temporary = tempfile.TemporaryDirectory() if args.db is None else None
    path = args.db if args.db is not None else Path(temporary.name) / "records.sqlite3"  # type: ignore[union-attr]
    url = f"sqlite:///{path.resolve()}"
    try:
        serials = _existing(path, args.rows)
        fill_s = None
        if serials is None:
            if path.exists():
                path.unlink()
            upgrade(url)
            print(f"filling {path} with {args.rows:,} token rows", file=sys.stderr)
            serials, fill_s = fill(path, args.rows, args.seed)
        results = {
            "rows": args.rows,
            "fill_seconds": fill_s,
            "database_bytes": path.stat().st_size,
            "sqlite": sqlite3.sqlite_version,
            **measure(url, serials, args.rows, args.lookups, args.seed),
        }
    finally:
        if temporary is not None:
            temporary.cleanup()
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
