"""GET /metrics parsed as Prometheus parses it, and /readyz with its three promises: clock good, key usable,
records writable (issue 6, observability; SPEC OPS-03, OPS-05, OPS-06, OPS-09)."""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from stampd import app as app_module
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.der.request import encode_request
from stampd.der.token_reader import read_response
from stampd.errors import FailureInfo, RecordingError
from stampd.model import MessageImprint, TimeStampRequest, TokenRecord
from stampd.oids import SHA256
from stampd.records.migrate import upgrade
from stampd.records.store import RecordStore
from stampd.server.asgi import TimeStampApp

sys.path.insert(0, str(Path(__file__).parents[1]))

from asgitools import call_app
from recordstools import ADMIN_URL, postgres_database


def _demo(tmp_path: Path) -> Path:
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "tsa")])
    assert result.exit_code == 0, result.output
    return tmp_path / "tsa" / "stampd.toml"


async def _get(app: TimeStampApp, path: str, body: bytes = b"", method: str = "GET") -> tuple[int, bytes]:
    return await call_app(app, method, path, headers=[(b"content-type", b"application/timestamp-query")], body=body)


def _query() -> bytes:
    imprint = MessageImprint(SHA256.oid, True, secrets.token_bytes(32))
    return encode_request(TimeStampRequest(1, imprint, None, secrets.randbits(62), True, ()))


def _samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the text format, with Prometheus' own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def _service(app: TimeStampApp) -> Any:
    return app._on_startup.__self__  # type: ignore[attr-defined]


def test_metrics_parse_and_cover_commits_certificates_and_readiness(tmp_path: Path) -> None:
    """Three tokens: the record-commit histograms count at least one batch and three records; the certificate's
    days left (notAfter, 5 years in the demo PKI) are more than the key's signing days left (privateKeyUsagePeriod,
    2 years); every readiness check is 1."""
    app = app_module.create_app(load_config(_demo(tmp_path)))

    async def run() -> tuple[bytes, bytes]:
        await app._on_startup()
        try:
            _, before = await _get(app, "/metrics")
            for _ in range(3):
                status, reply = await _get(app, "/", _query(), method="POST")
                assert status == 200 and read_response(reply).status.fail_bits == ()
            assert (await _get(app, "/readyz"))[0] == 200
            _, after = await _get(app, "/metrics")
            return before, after
        finally:
            await app._on_shutdown()

    before, after = asyncio.run(run())
    old, new = _samples(before), _samples(after)
    families = {family.name: family.type for family in text_string_to_metric_families(after.decode())}
    assert families["stampd_record_commit_seconds"] == "histogram"
    assert families["stampd_record_batch_size"] == "histogram"
    assert families["stampd_tsu_certificate_days_left"] == families["stampd_readiness"] == "gauge"

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return new[(name, labels)] - old.get((name, labels), 0.0)

    batches = delta("stampd_record_commit_seconds_count")
    assert 1 <= batches <= 3
    assert delta("stampd_record_batch_size_count") == batches
    assert delta("stampd_record_batch_size_sum") == 3
    assert delta("stampd_record_commit_seconds_sum") > 0
    tsu = (("tsu", "default"),)
    certificate_days = new[("stampd_tsu_certificate_days_left", tsu)]
    signing_days = new[("stampd_tsu_signing_days_left", tsu)]
    assert 4 * 365 < certificate_days <= 5 * 366 and 365 < signing_days <= 2 * 366
    for check in ("clock", "keys", "records", "tsus"):
        assert new[("stampd_readiness", (("check", check),))] == 1.0


def test_a_key_that_fails_its_test_signature_makes_readyz_fail_until_it_signs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's periodic test signature (never the /readyz request itself) finds a key that stopped
    signing, as an HSM that went away would: /readyz is 503 naming the TSU and the error, and 200 again once a
    later test signature works."""
    monkeypatch.setattr(app_module, "KEY_CHECK_INTERVAL_S", 0.0)
    app = app_module.create_app(load_config(_demo(tmp_path)))
    service = _service(app)
    (signer,) = service.tsus.signers
    working = signer._sign

    def unplugged(data: bytes) -> bytes:
        raise OSError("the HSM does not answer")

    async def run() -> list[tuple[int, str]]:
        await app._on_startup()
        seen = []
        try:
            signer._sign = unplugged
            seen.append(await _get(app, "/readyz"))  # /readyz itself signs nothing: still ready
            service.check_keys()
            seen.append(await _get(app, "/readyz"))
            signer._sign = working
            service.check_keys()
            seen.append(await _get(app, "/readyz"))
        finally:
            await app._on_shutdown()
        return [(status, body.decode()) for status, body in seen]

    untested, failed, recovered = asyncio.run(run())
    assert untested[0] == 200
    assert failed[0] == 503
    assert "tsu default: key not usable: cannot sign a token: signing failed: OSError" in failed[1]
    assert recovered[0] == 200 and "tsu default: active" in recovered[1]


def test_records_that_cannot_be_written_make_readyz_fail_until_they_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the database file replaced under the server. A token request fails (systemFailure) and /readyz
    says 'records not writable' at once; the idle probe keeps saying so; with the file back, the probe clears it."""
    monkeypatch.setattr(app_module, "RECORDS_PROBE_IDLE_S", 0.0)
    config = load_config(_demo(tmp_path))
    database = Path(config.records.url.removeprefix("sqlite:///"))
    app = app_module.create_app(config)
    service = _service(app)

    async def run() -> list[tuple[int, str]]:
        await app._on_startup()
        seen = []
        try:
            await service.check_records()
            seen.append(await _get(app, "/readyz"))
            database.rename(database.with_suffix(".moved"))
            database.write_bytes(database.with_suffix(".moved").read_bytes())  # same content, another file
            status, reply = await _get(app, "/", _query(), method="POST")
            assert status == 200 and read_response(reply).status.fail_bits == (FailureInfo.SYSTEM_FAILURE,)
            seen.append(await _get(app, "/readyz"))
            await service.check_records()
            seen.append(await _get(app, "/readyz"))
            database.with_suffix(".moved").replace(database)
            await service.check_records()
            seen.append(await _get(app, "/readyz"))
        finally:
            await app._on_shutdown()
        return [(status, body.decode()) for status, body in seen]

    ready, after_commit, after_probe, recovered = asyncio.run(run())
    assert ready[0] == 200 and "records writable" in ready[1]
    for status, text in (after_commit, after_probe):
        assert status == 503
        assert f"records not writable: RecordingError: the records database {database} was removed or replaced" in text
    assert recovered[0] == 200 and "records writable" in recovered[1]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_postgresql_probe_sees_a_read_only_database_and_its_recovery(pg_url: str) -> None:
    """A database switched to read-only (as a standby after a bad failover is): the write probe fails with the
    server's reason, and a token commit fails too; back to read-write, both work again."""
    upgrade(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    store = RecordStore(pg_url)

    def read_only(on: bool) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                    sql.Identifier(database), sql.SQL("on" if on else "off")
                )
            )
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))

    record = TokenRecord(
        serial=secrets.randbits(120),
        gen_time_ns=1_800_000_000_000_000_000,
        gen_time="20270115080000Z",
        tsu="default",
        policy="2.25.7",
        hash_oid=SHA256.oid,
        imprint=bytes(32),
        nonce=None,
        token=b"\x30\x00",
        requester=None,
    )

    def probes() -> list[str | None]:
        """Two probes: the first after a backend was terminated may only find its pooled connection gone."""
        return [store.probe_writable(), store.probe_writable()]

    try:
        assert store.probe_writable() is None and store.write_error is None
        read_only(True)
        errors = probes()
        assert None not in errors and "read-only transaction" in str(errors[-1]) and store.write_error == errors[-1]
        with pytest.raises(RecordingError):
            asyncio.run(store.record(record))
        assert store.write_error is not None and "read-only transaction" in store.write_error
        read_only(False)
        assert probes()[-1] is None and store.write_error is None
        asyncio.run(store.record(record))
        assert store.write_error is None
    finally:
        store.close()
