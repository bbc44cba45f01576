"""Retention and archives end to end (issue "Evidence that scales", item 4) with the real command line:
`stampd records purge` (in steps of --batch-rows) on SQLite and PostgreSQL leaves records that `stampd audit
verify` accepts and in which tampering is still found; `stampd records export` of a live TSA's tokens passes
`stampd records verify-archive` offline, and a flipped byte fails it; `stampd terminate --export` writes such an
archive (SPEC OPS-08, OPS-09, OPS-11)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import TsaFactory, run_stampd

from stampd.app import create_app
from stampd.config import load_config
from stampd.model import MessageImprint, TimeStampRequest, TokenRecord
from stampd.oids import SHA256
from stampd.records.checkpoint import CheckpointSigner
from stampd.records.store import RecordStore
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file

sys.path.insert(0, str(Path(__file__).parents[1]))

from recordstools import postgres_database

pytestmark = pytest.mark.integration

DAY_US = 86_400_000_000


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def init_tsa(directory: Path, url: str | None = None) -> Path:
    """`stampd init` (Ed25519), with one day's retention and optionally other records; schema upgraded."""
    run_stampd("init", directory, "--key-type", "ed25519")
    config = directory / "stampd.toml"
    text = config.read_text().replace('checkpoint_interval = "5m"', 'checkpoint_interval = "5m"\nretention = "1d"')
    if url is not None:
        text = text.replace('url = "sqlite:///records.sqlite3"', f'url = "{url}"')
    config.write_text(text)
    run_stampd("db", "upgrade", "-c", config)
    return config


def fill_aged(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Tokens aged 9, 8, 7, 0.5 days and two events 9 days old, from one process run (ended by a checkpoint, as
    `stampd serve` ends); returns its chain id."""
    config = load_config(config_path)
    records = config.records
    assert records.checkpoint_key is not None and records.checkpoint_passphrase_file is not None
    signer = CheckpointSigner(
        load_encrypted_key(records.checkpoint_key, read_passphrase_file(records.checkpoint_passphrase_file))
    )
    now_us = time.time_ns() // 1000
    store = RecordStore(records.url)

    async def record_all() -> None:
        for i, age in enumerate([9, 8, 7, 0.5], 1):
            await store.record(
                TokenRecord(
                    serial=2**100 + i,
                    gen_time_ns=(now_us - int(age * DAY_US)) * 1000,
                    gen_time="20260101000000Z",
                    tsu="default",
                    policy="2.25.7",
                    hash_oid=SHA256.oid,
                    imprint=bytes([i]) * 32,
                    nonce=None,
                    token=b"\x30\x03" + bytes([i]) * 3,
                    requester=None,
                )
            )

    asyncio.run(record_all())
    with monkeypatch.context() as m:
        m.setattr(time, "time_ns", lambda: (now_us - 9 * DAY_US) * 1000)
        store.record_event("service.started", {"pid": 1})
        store.record_event("service.stopped", {"pid": 1})
    assert store.write_checkpoint(signer) is not None
    store.close()
    return store.chain_id


def audit_verify(config: Path) -> tuple[int, dict[str, object], str]:
    result = run_stampd("audit", "verify", "-c", config, "--json", check=False)
    return result.returncode, json.loads(result.stdout), result.stderr


def purge_then_audit(config: Path, chain: str) -> None:
    dry = json.loads(run_stampd("records", "purge", "-c", config, "--dry-run", "--batch-rows", "2", "--json").stdout)
    assert dry["purged"] == {"tokens": 3, "events": 2} and dry["event_chain"] is None and dry["steps"] == 3
    purged = json.loads(run_stampd("records", "purge", "-c", config, "--batch-rows", "2", "--json").stdout)
    assert purged["purged"] == {"tokens": 3, "events": 2} and purged["steps"] == 3
    assert purged["anchors"]["tokens"][chain][0] == 3
    status, report, errors = audit_verify(config)
    assert status == 0, (report, errors)
    chains = {(c["table"], c["chain"]): c for c in report["chains"]}  # type: ignore[attr-defined]
    assert chains[("tokens", chain)]["purged_through"] == 3 and chains[("tokens", chain)]["count"] == 1
    assert chains[("events", purged["event_chain"])]["checkpointed_seq"] == 3  # every step is signed
    again = json.loads(run_stampd("records", "purge", "-c", config, "--json").stdout)
    assert again["purged"] == {"tokens": 0, "events": 0} and again["anchors"] == purged["anchors"]
    assert audit_verify(config)[0] == 0


def test_purge_on_sqlite_keeps_the_audit_passing_and_tampering_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = init_tsa(tmp_path / "tsa")
    chain = fill_aged(config, monkeypatch)
    purge_then_audit(config, chain)
    with sqlite3.connect(tmp_path / "tsa" / "records.sqlite3", isolation_level=None) as conn:
        conn.execute("DELETE FROM tokens WHERE seq = 4")  # what the purge left of the chain
        conn.execute(
            "INSERT INTO tokens (serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, token, chain, seq, "
            "prev_hash, entry_hash) VALUES ('ff', 'x', 1, 'd', '1.2', '1.2', x'00', x'00', ?, 2, x'00', x'00')",
            (chain,),
        )
    conn.close()
    status, report, _ = audit_verify(config)
    assert status == 1
    assert f"tokens chain {chain} seq 2 (serial 0xff): present, but seq 1-3 were purged" in report["problems"][0]  # type: ignore[index]


def test_purge_on_postgresql_keeps_the_audit_passing_and_tampering_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    config = init_tsa(tmp_path / "tsa", pg_url)
    chain = fill_aged(config, monkeypatch)
    purge_then_audit(config, chain)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        details = [d for (d,) in conn.execute("SELECT detail FROM events WHERE kind = 'records.purged' ORDER BY id")]
        detail = next(d for d in details if json.loads(d)["anchors"].get("tokens", {}).get(chain, [0])[0] == 3)
        edited = json.loads(detail)
        edited["anchors"]["tokens"][chain][0] = 2  # claim less was purged
        conn.execute("UPDATE events SET detail = %s WHERE detail = %s", (json.dumps(edited), detail))
    status, report, _ = audit_verify(config)
    assert status == 1
    problems = report["problems"]
    assert any("records.purged" in p and "edited" in p for p in problems), problems  # type: ignore[attr-defined]


def test_export_of_a_live_tsa_verifies_offline_and_a_flipped_byte_fails(
    tsa_factory: TsaFactory, tmp_path: Path
) -> None:
    tsa = tsa_factory("ec-p256", name="retention-export")
    data = tmp_path / "document.txt"
    for i in range(4):
        data.write_text(f"document {i}")
        tsa.run("stamp", "--url", tsa.url, data, "-o", tmp_path / f"t{i}.tsr")
    archive = tmp_path / "records.zip"
    tsa.stampd("records", "export", "--from", "2000-01-01", "--to", "2200-01-01T00:00:00Z", archive)
    result = run_stampd("records", "verify-archive", archive, "--json", check=False)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["counts"]["tokens"] == len(tsa.records()) >= 4
    assert report["manifest_signed"] is True

    with zipfile.ZipFile(archive) as z:
        members = {name: z.read(name) for name in z.namelist()}
    broken = bytearray(members["tokens.jsonl"])
    broken[len(broken) // 2] ^= 0x20
    members["tokens.jsonl"] = bytes(broken)
    altered = tmp_path / "altered.zip"
    with zipfile.ZipFile(altered, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    result = run_stampd("records", "verify-archive", altered, check=False)
    assert result.returncode == 1
    assert "problem: tokens.jsonl: its SHA-256 or size is not the manifest's" in result.stdout


def test_export_on_postgresql_verifies_offline(tmp_path: Path, pg_url: str) -> None:
    config_path = init_tsa(tmp_path / "tsa", pg_url)
    app = create_app(load_config(config_path))

    async def issue() -> None:
        await app._on_startup()
        for i in range(3):
            digest = hashlib.sha256(bytes([i])).digest()
            request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, i + 1, True, ())
            assert (await app._units["/"].respond(request, None)).granted
        await app._on_shutdown()

    asyncio.run(issue())
    archive = tmp_path / "records.zip"
    run_stampd("records", "export", "-c", config_path, "--from", "2000-01-01", "--to", "2200-01-01", archive)
    result = run_stampd("records", "verify-archive", archive, check=False)
    assert result.returncode == 0, result.stdout
    assert "tokens:       3" in result.stdout and "Archive: OK" in result.stdout


def test_terminate_writes_a_self_verifying_archive_ops_11(tsa_factory: TsaFactory, tmp_path: Path) -> None:
    tsa = tsa_factory("ec-p256", name="retention-terminate")
    data = tmp_path / "document.txt"
    data.write_text("before the end")
    tsa.run("stamp", "--url", tsa.url, data, "-o", tmp_path / "t.tsr")
    archive = tmp_path / "final.zip"
    output = tsa.stampd("terminate", "--export", archive, "--yes").stdout
    assert f"records archive: {archive}" in output
    result = run_stampd("records", "verify-archive", archive, "--json", check=False)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["counts"]["tokens"] == len(tsa.records())
    with zipfile.ZipFile(archive) as z:
        kinds = [json.loads(line)["kind"] for line in z.read("events.jsonl").splitlines()]
    assert "tsu.terminated" in kinds
