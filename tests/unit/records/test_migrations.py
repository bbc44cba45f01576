"""The records schema is managed by the migrations alone: `stampd db upgrade` makes it, the server refuses any
other revision (SPEC OPS-09, OPS-10)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine

from stampd.cli.main import cli
from stampd.config import load_config
from stampd.errors import RecordingError
from stampd.model import TokenRecord
from stampd.records.engine import open_engine
from stampd.records.migrate import _config, current_revision, head_revision, upgrade
from stampd.records.schema import metadata
from stampd.records.store import RecordStore


def token_record(serial: int, tsu: str = "default") -> TokenRecord:
    return TokenRecord(
        serial=serial,
        gen_time_ns=1772366400_123_000_000,
        gen_time="20260301120000.123Z",
        tsu=tsu,
        policy="2.25.7",
        hash_oid="2.16.840.1.101.3.4.2.1",
        imprint=b"\x01" * 32,
        nonce=None,
        token=b"\x30\x03" + serial.to_bytes(20, "big"),
        requester="127.0.0.1",
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'records.sqlite3'}"


def test_upgrade_creates_the_schema_of_the_code_private(url: str, tmp_path: Path) -> None:
    assert current_revision(url) is None
    assert not (tmp_path / "records.sqlite3").exists()  # asking the revision creates nothing
    assert upgrade(url) == head_revision() == "0003"
    assert current_revision(url) == head_revision()
    assert (tmp_path / "records.sqlite3").stat().st_mode & 0o777 == 0o600
    engine = create_engine(url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == []  # the migrations build exactly the tables stampd.records.schema describes


def test_the_trigger_refuses_records_of_a_stopped_tsu(url: str) -> None:
    upgrade(url)
    store = RecordStore(url)
    try:
        store.check_schema()
        assert asyncio.run(store.record(token_record(1, "a"))) is None
        store.stop_tsu("a", "compromised", since_us=0, reason="test", detail={})
        with pytest.raises(RecordingError):
            asyncio.run(store.record(token_record(2, "a")))
        assert asyncio.run(store.record(token_record(3, "b"))) is None  # other TSUs go on
        assert store.token_by_serial(2) is None
        assert [e["kind"] for e in store.events()] == ["tsu.compromised"]
    finally:
        store.close()


def test_the_server_refuses_an_empty_database(url: str) -> None:
    store = RecordStore(url)
    try:
        with pytest.raises(RecordingError) as refused:
            store.check_schema("/etc/stampd/stampd.toml")
    finally:
        store.close()
    assert str(refused.value) == (
        "the records schema is at empty (no records schema), this stampd needs 0003: "
        "run `stampd db upgrade -c /etc/stampd/stampd.toml`"
    )


def test_the_server_refuses_an_unknown_revision(url: str, tmp_path: Path) -> None:
    """A database migrated by a newer stampd (or anything else) is not written to by this one."""
    upgrade(url)
    with sqlite3.connect(tmp_path / "records.sqlite3") as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    db.close()
    assert current_revision(url) == "0099"
    store = RecordStore(url)
    try:
        with pytest.raises(RecordingError, match=r"the records schema is at 0099, this stampd needs 0003: run `stampd"):
            store.check_schema()
    finally:
        store.close()
    with pytest.raises(RecordingError, match="cannot upgrade the records"):
        upgrade(url)  # alembic does not know 0099 either: nothing is touched


def test_a_store_without_schema_answers_recording_errors(url: str) -> None:
    """Even without the serving check, a database without tables never grants: every record fails."""
    store = RecordStore(url)
    try:
        with pytest.raises(RecordingError):
            asyncio.run(store.record(token_record(1)))
    finally:
        store.close()


def test_db_upgrade_and_current_commands_are_idempotent(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    runner = CliRunner()
    init = runner.invoke(cli, ["init", str(directory)])
    assert init.exit_code == 0, init.output
    config = str(directory / "stampd.toml")
    url = load_config(config).records.url
    assert current_revision(url) == head_revision()  # `stampd init` leaves a database ready to serve
    current = runner.invoke(cli, ["db", "current", "-c", config])
    assert (current.exit_code, current.output) == (0, "0003 (head)\n")
    for _ in range(2):
        again = runner.invoke(cli, ["db", "upgrade", "-c", config])
        assert (again.exit_code, again.output) == (0, "the records schema is already at 0003\n")
    assert current_revision(url) == head_revision()


def test_db_commands_on_a_new_database(tmp_path: Path) -> None:
    directory = tmp_path / "tsa"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(directory)]).exit_code == 0
    for database in directory.glob("records.sqlite3*"):
        database.unlink()  # as if records.url had just been pointed at a new database
    config = str(directory / "stampd.toml")
    current = runner.invoke(cli, ["db", "current", "-c", config])
    assert current.exit_code == 1
    assert current.output == f"empty (this stampd needs 0003: run `stampd db upgrade -c {config}`)\n"
    assert not (directory / "records.sqlite3").exists()
    upgraded = runner.invoke(cli, ["db", "upgrade", "-c", config])
    assert (upgraded.exit_code, upgraded.output) == (0, "the records schema is now at 0003 (was empty)\n")
    assert (directory / "records.sqlite3").stat().st_mode & 0o777 == 0o600


def test_0003_keeps_the_tokens_and_the_trigger_and_goes_back(url: str) -> None:
    """Revision 0003 (subscribers) on a database at 0002 with tokens: they stay, anonymous; the stopped-TSU
    trigger survives the ADD COLUMN; and a downgrade to 0002 removes exactly what 0003 added."""

    def migrate(step: object, revision: str) -> None:
        engine = open_engine(url, create=True, pooled=False)
        with engine.begin() as connection:
            config = _config()
            config.attributes["connection"] = connection
            step(config, revision)  # type: ignore[operator]
        engine.dispose()

    migrate(command.upgrade, "0002")
    database = url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        db.execute(
            "INSERT INTO tokens (serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, token) "
            "VALUES ('1', 'g', 1, 'a', 'p', 'h', x'01', x'30')"
        )
    db.close()
    assert upgrade(url) == "0003"
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT serial, subscriber FROM tokens").fetchall() == [("1", None)]
        db.execute("INSERT INTO tsu_states (tsu, state, at_us) VALUES ('a', 'terminated', 1)")
        with pytest.raises(sqlite3.IntegrityError, match="compromised or terminated"):
            db.execute(
                "INSERT INTO tokens (serial, gen_time, gen_time_us, tsu, policy, hash_oid, imprint, token) "
                "VALUES ('2', 'g', 1, 'a', 'p', 'h', x'01', x'30')"
            )
    db.close()
    migrate(command.downgrade, "0002")
    with sqlite3.connect(database) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(tokens)")}
    db.close()
    assert not {"subscribers", "usage_counters"} & tables
    assert "subscriber" not in columns
    assert current_revision(url) == "0002"
