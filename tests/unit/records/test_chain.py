"""Hash chains over tokens and events, signed checkpoints, and the audit that walks them (issue "Evidence that
scales", item 3): every edit, deletion, insertion, reordering or truncation is found and named."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from stampd.cli.main import cli
from stampd.config import load_config
from stampd.model import TokenRecord
from stampd.records.audit import AuditReport, audit_records
from stampd.records.chain import GENESIS, token_entry_hash
from stampd.records.checkpoint import CheckpointSigner
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SIGNER = CheckpointSigner(KEY)


def record(serial: int, imprint: bytes = b"\x01" * 32) -> TokenRecord:
    return TokenRecord(
        serial=serial,
        gen_time_ns=1772366400_123_000_000 + serial % 1000 * 1000,
        gen_time="20260301120000.123Z",
        tsu="default",
        policy="2.25.7",
        hash_oid="2.16.840.1.101.3.4.2.1",
        imprint=imprint,
        nonce=serial if serial % 2 else None,
        token=b"\x30\x03" + serial.to_bytes(20, "big"),
        requester="::1",
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "records.sqlite3"


@pytest.fixture
def url(path: Path) -> str:
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


@pytest.fixture
def store(url: str) -> Iterator[RecordStore]:
    s = RecordStore(url)
    yield s
    s.close()


async def record_all(store: RecordStore, records: list[TokenRecord]) -> list[BaseException | None]:
    return await asyncio.gather(*(store.record(r) for r in records), return_exceptions=True)


def audit(url: str) -> AuditReport:
    return audit_records(url, KEY.public_key())


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def filled(store: RecordStore, count: int = 20, signer: CheckpointSigner = SIGNER) -> None:
    """``count`` tokens (serials 1..count, seq = serial) and three events, checkpointed."""
    assert asyncio.run(record_all(store, [record(i) for i in range(1, count + 1)])) == [None] * count
    for kind in ("service.started", "clock.synchronised", "config.reloaded"):
        store.record_event(kind, {"pid": 1})
    assert store.write_checkpoint(signer) is not None


def only_problem(report: AuditReport) -> str:
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_concurrent_records_form_one_intact_chain(store: RecordStore, url: str, path: Path) -> None:
    records = [record(2**100 + i) for i in range(1000)]
    assert asyncio.run(record_all(store, records)) == [None] * 1000
    with db(path) as conn:
        rows = conn.execute("SELECT chain, seq, prev_hash, entry_hash FROM tokens ORDER BY seq").fetchall()
    assert {r[0] for r in rows} == {store.chain_id}
    assert [r[1] for r in rows] == list(range(1, 1001))
    assert rows[0][2] == GENESIS
    assert all(rows[i][2] == rows[i - 1][3] for i in range(1, 1000))
    report = audit(url)
    assert report.ok, report.problems
    (chain,) = report.chains
    assert (chain.table, chain.count, chain.head_seq, chain.head_hash) == ("tokens", 1000, 1000, rows[-1][3].hex())


def test_a_failed_duplicate_serial_leaves_no_gap(store: RecordStore, url: str, path: Path) -> None:
    asyncio.run(record_all(store, [record(1)]))
    outcomes = asyncio.run(record_all(store, [record(2), record(1), record(3)]))
    assert outcomes[0] is None and outcomes[2] is None and outcomes[1] is not None
    with db(path) as conn:
        assert conn.execute("SELECT serial, seq FROM tokens ORDER BY seq").fetchall() == [("1", 1), ("2", 2), ("3", 3)]
    assert audit(url).ok


def test_entry_hash_covers_every_field_and_position() -> None:
    row = {
        "serial": "1",
        "gen_time": "20260301120000Z",
        "gen_time_us": 1,
        "tsu": "a",
        "policy": "2.25.7",
        "hash_oid": "2.16.840.1.101.3.4.2.1",
        "imprint": b"\x01",
        "nonce": None,
        "requester": None,
        "token": b"\x30\x00",
    }
    base = token_entry_hash(GENESIS, "c", 1, row)
    assert token_entry_hash(GENESIS, "c", 2, row) != base
    assert token_entry_hash(GENESIS, "d", 1, row) != base
    assert token_entry_hash(b"\x01" * 32, "c", 1, row) != base
    assert token_entry_hash(GENESIS, "c", 1, {**row, "nonce": ""}) != base  # absent is not empty
    assert token_entry_hash(GENESIS, "c", 1, {**row, "tsu": "a2", "policy": ".25.7"}) != base  # fields don't merge


def test_init_makes_a_checkpoint_key_and_audit_verify_uses_it(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    assert CliRunner().invoke(cli, ["init", str(directory)]).exit_code == 0
    config = load_config(directory / "stampd.toml")
    assert config.records.checkpoint_key == directory / "pki" / "checkpoint-key.pem"
    assert config.records.checkpoint_key.stat().st_mode & 0o777 == 0o600
    assert config.records.checkpoint_interval_us == 300_000_000
    assert config.records.checkpoint_passphrase_file is not None
    key = load_encrypted_key(
        config.records.checkpoint_key, read_passphrase_file(config.records.checkpoint_passphrase_file)
    )
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    store = RecordStore(config.records.url)
    filled(store, 20, CheckpointSigner(key))
    store.close()

    args = ["audit", "verify", "-c", str(directory / "stampd.toml")]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["checkpoints"] == 1
    assert {(c["table"], c["count"], c["checkpointed_seq"]) for c in report["chains"]} == {
        ("tokens", 20, 20),
        ("events", 3, 3),
    }
    public = directory / "pki" / "checkpoint-public.pem"
    text = CliRunner().invoke(cli, [*args, "--public-key", str(public)])
    assert text.exit_code == 0, text.output
    assert text.output.endswith("checkpoints verified: 1\nAudit: OK\n")
    other = tmp_path / "other.pem"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    wrong = CliRunner().invoke(cli, [*args, "--public-key", str(other)])
    assert wrong.exit_code == 1
    assert "checkpoint 1: signed by another key" in wrong.output and "Audit: FAILED" in wrong.output


def test_checkpoints_need_a_key_to_pass(store: RecordStore, url: str) -> None:
    filled(store)
    assert "cannot be checked without the checkpoint key" in only_problem(audit_records(url, None))


def test_edited_token_is_named(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    with db(path) as conn:
        conn.execute("UPDATE tokens SET imprint = ? WHERE seq = 7", (b"\x02" * 32,))
    problem = only_problem(audit(url))
    assert f"tokens chain {store.chain_id} seq 7 (serial 0x7): edited" in problem


def test_deleted_token_is_named(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    with db(path) as conn:
        conn.execute("DELETE FROM tokens WHERE seq = 5")
    problem = only_problem(audit(url))
    assert f"tokens chain {store.chain_id} seq 6 (serial 0x6): missing entry before it (seq 5 deleted)" in problem


def test_swapped_tokens_are_out_of_order(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    columns = (
        "serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, nonce, requester, token, prev_hash, entry_hash"
    )
    with db(path) as conn:
        a = conn.execute(f"SELECT {columns} FROM tokens WHERE seq = 4").fetchone()
        b = conn.execute(f"SELECT {columns} FROM tokens WHERE seq = 9").fetchone()
        sets = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
        conn.execute("UPDATE tokens SET serial = 'x' WHERE seq = 4")
        conn.execute(f"UPDATE tokens SET {sets} WHERE seq = 9", a)
        conn.execute(f"UPDATE tokens SET {sets} WHERE seq = 4", b)
    problem = only_problem(audit(url))
    assert (
        f"tokens chain {store.chain_id} seq 4 (serial 0x9): out of order (this entry was recorded at seq 9)" in problem
    )


@pytest.mark.parametrize("first", [1, 3, 19])
def test_swapped_neighbours_are_out_of_order(store: RecordStore, url: str, path: Path, first: int) -> None:
    """Two neighbours exchange places: the entry now first was recorded after the one now right behind it, so
    the report must not take it for an edit (seq 1 included: it follows the genesis hash)."""
    filled(store)
    with db(path) as conn:
        for old, new in ((first, -1), (first + 1, first), (-1, first + 1)):
            conn.execute("UPDATE tokens SET seq = ? WHERE seq = ?", (new, old))
    problem = only_problem(audit(url))
    assert problem == (
        f"tokens chain {store.chain_id} seq {first} (serial 0x{first + 1:x}): "
        f"out of order (this entry was recorded at seq {first + 1})"
    )


def test_edited_entry_after_its_neighbour_is_not_out_of_order(store: RecordStore, url: str, path: Path) -> None:
    """Swapped neighbours whose moved entry was also edited: no seq recomputes its hash, so it is an edit."""
    filled(store)
    with db(path) as conn:
        for old, new in ((3, -1), (4, 3), (-1, 4)):
            conn.execute("UPDATE tokens SET seq = ? WHERE seq = ?", (new, old))
        conn.execute("UPDATE tokens SET requester = '192.0.2.1' WHERE seq = 3")
    problem = only_problem(audit(url))
    assert problem == (
        f"tokens chain {store.chain_id} seq 3 (serial 0x4): edited (it no longer links to the entry before it)"
    )


def test_forged_insertion_is_named(store: RecordStore, url: str, path: Path) -> None:
    """A forger who knows the hash function inserts a well-formed entry after seq 10 and renumbers the rest."""
    filled(store)
    forged = {
        "serial": "ff",
        "gen_time": "20260301120000.123Z",
        "gen_time_us": 1,
        "tsu": "default",
        "policy": "2.25.7",
        "hash_oid": "2.16.840.1.101.3.4.2.1",
        "imprint": b"\x09" * 32,
        "nonce": None,
        "requester": "::1",
        "token": b"\x30\x00",
    }
    with db(path) as conn:
        (prev,) = conn.execute("SELECT entry_hash FROM tokens WHERE seq = 10").fetchone()
        conn.execute("UPDATE tokens SET seq = -seq WHERE seq > 10")
        conn.execute("UPDATE tokens SET seq = 1 - seq WHERE seq < 0")
        entry = token_entry_hash(prev, store.chain_id, 11, forged)
        names = ", ".join(forged)
        conn.execute(
            f"INSERT INTO tokens ({names}, chain, seq, prev_hash, entry_hash) VALUES ({', '.join('?' * 14)})",
            (*forged.values(), store.chain_id, 11, prev, entry),
        )
    problem = only_problem(audit(url))
    assert f"tokens chain {store.chain_id} seq 11 (serial 0xff): inserted" in problem
    assert "serial 0xb, was recorded right after seq 10" in problem


def test_truncated_tail_is_caught_by_the_checkpoint(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    with db(path) as conn:
        conn.execute("DELETE FROM tokens WHERE seq > 17")
    problem = only_problem(audit(url))
    assert f"tokens chain {store.chain_id} seq 18: missing: checkpoint 1" in problem
    assert "has seq 20, the chain ends at seq 17" in problem


def test_rewritten_chain_is_caught_by_the_checkpoint(store: RecordStore, url: str, path: Path) -> None:
    """Every hash recomputed after an edit: the chain is consistent again, but no longer what was signed."""
    filled(store)
    with db(path) as conn:
        conn.execute("UPDATE tokens SET imprint = ? WHERE seq = 19", (b"\x02" * 32,))
        prev = conn.execute("SELECT entry_hash FROM tokens WHERE seq = 18").fetchone()[0]
        for seq in (19, 20):
            row = conn.execute("SELECT * FROM tokens WHERE seq = ?", (seq,)).fetchone()
            names = [d[0] for d in conn.execute("SELECT * FROM tokens LIMIT 0").description]
            fields = dict(zip(names, row, strict=True))
            entry = token_entry_hash(prev, store.chain_id, seq, fields)
            conn.execute("UPDATE tokens SET prev_hash = ?, entry_hash = ? WHERE seq = ?", (prev, entry, seq))
            prev = entry
    problem = only_problem(audit(url))
    assert f"tokens chain {store.chain_id} seq 20 (serial 0x14): differs from checkpoint 1" in problem


def test_forged_checkpoint_is_refused(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    with db(path) as conn:
        conn.execute("UPDATE checkpoints SET at_us = at_us + 1")
    assert "checkpoint 1: the signature does not verify" in only_problem(audit(url))
    other = ed25519.Ed25519PrivateKey.generate()
    assert "signed by another key" in only_problem(audit_records(url, other.public_key()))


def test_edited_event_is_named(store: RecordStore, url: str, path: Path) -> None:
    filled(store)
    with db(path) as conn:
        conn.execute("""UPDATE events SET detail = '{"pid": 2}' WHERE seq = 2""")
    problem = only_problem(audit(url))
    assert f"events chain {store.chain_id} seq 2 (event clock.synchronised): edited" in problem


def test_every_store_has_chains_of_its_own_and_old_rows_are_unchained(store: RecordStore, url: str, path: Path) -> None:
    filled(store, 5)
    other = RecordStore(url)
    assert other.chain_id != store.chain_id
    asyncio.run(record_all(other, [record(100), record(101)]))
    other.stop_tsu("default", "terminated", since_us=None, reason="test", detail={"by": "test"})
    assert other.write_checkpoint(SIGNER) is not None
    assert other.write_checkpoint(SIGNER) is None  # nothing new: no checkpoint
    other.close()
    with db(path) as conn:
        conn.execute("INSERT INTO events (at_us, kind, detail) VALUES (1, 'legacy', '{}')")
    report = audit(url)
    assert report.ok, report.problems
    assert report.unchained == {"tokens": 0, "events": 1}
    assert report.checkpoints == 2
    assert sorted((c.table, c.count) for c in report.chains) == [
        ("events", 1),
        ("events", 3),
        ("tokens", 2),
        ("tokens", 5),
    ]
