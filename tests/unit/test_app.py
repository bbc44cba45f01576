"""The composition root in-process: start-up and stop events, key life-cycle events (SPEC OPS-05, OPS-08)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from stampd.app import _signing_key, create_app, load_tsu
from stampd.certprofile import signing_window
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.der.token_reader import read_response
from stampd.errors import FailureInfo, PKIError
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.records.store import RecordStore
from stampd.server.asgi import TimeStampApp


def run_service_once(config_path: Path) -> None:
    app = create_app(load_config(config_path))

    async def lifespan() -> None:
        await app._on_startup()
        await asyncio.sleep(0.05)
        await app._on_shutdown()

    asyncio.run(lifespan())


def test_key_expiring_is_recorded_once_per_key_across_restarts(tmp_path: Path) -> None:
    """A renewal horizon longer than the key's signing window: the key is 'expiring' from the first second."""
    directory = tmp_path / "tsa"
    assert CliRunner().invoke(cli, ["init", str(directory)]).exit_code == 0
    config_path = directory / "stampd.toml"
    text = config_path.read_text()
    config_path.write_text(text.replace("[tsu.default]\n", '[tsu.default]\nrenew_before = "3650d"\n', 1))
    for _ in range(2):
        run_service_once(config_path)
    store = RecordStore(load_config(config_path).records.url, create=False)
    kinds = [e["kind"] for e in store.events()]
    store.close()
    assert kinds.count("key.expiring") == 1
    assert kinds.count("service.started") == 2 and kinds.count("service.stopped") == 2
    assert "key.expired" not in kinds


def make_tsa(tmp_path: Path, *args: str) -> Path:
    directory = tmp_path / "tsa"
    result = CliRunner().invoke(cli, ["init", str(directory), *args])
    assert result.exit_code == 0, result.output
    return directory / "stampd.toml"


def test_signing_window_ends_exactly_at_the_key_usage_period_end_crt_06(tmp_path: Path) -> None:
    """A genTime of T.001 after a window ending at T would fail every verifier: the window end is T.000 exactly."""
    config = load_config(make_tsa(tmp_path))
    item = load_tsu(config.tsus[0], datetime.now(UTC))
    key = _signing_key(item, 1_000_000, time.time_ns())
    end = signing_window(item.certificate)[1]
    assert key.not_after_ns == int(end.timestamp()) * 1_000_000_000
    item.signer.close()


def test_a_compromised_key_stays_refused_under_another_name_ops_10(tmp_path: Path) -> None:
    config_path = make_tsa(tmp_path)
    result = CliRunner().invoke(
        cli, ["tsu", "compromise", "default", "--since", "2026-01-01T00:00:00Z", "-c", str(config_path)]
    )
    assert result.exit_code == 0, result.output
    renamed = (
        config_path.read_text()
        .replace("[tsu.default]", "[tsu.renamed]")
        .replace("[tsu.default.key]", "[tsu.renamed.key]")
    )
    config_path.write_text(renamed)
    with pytest.raises(PKIError, match="belongs to a TSU that is compromised"):
        create_app(load_config(config_path))


def test_a_stopped_tsu_without_its_key_still_starts_and_refuses_ops_11(tmp_path: Path) -> None:
    """After compromise and key destruction the server starts; the stopped TSU answers systemFailure."""
    config_path = make_tsa(tmp_path, "--tsu", "a", "--tsu", "b")
    runner = CliRunner()
    assert (
        runner.invoke(
            cli, ["tsu", "compromise", "b", "--since", "2026-01-01T00:00:00Z", "-c", str(config_path)]
        ).exit_code
        == 0
    )
    config = load_config(config_path)
    b = next(t for t in config.tsus if t.name == "b")
    assert b.key.path is not None
    b.key.path.unlink()
    app = create_app(config)
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, bytes(32)), None, 5, True, ())
    reply_b = asyncio.run(app._units["/b"].respond(request, None))
    assert reply_b.fail_info == FailureInfo.SYSTEM_FAILURE
    assert read_response(reply_b.body).status.fail_bits == (FailureInfo.SYSTEM_FAILURE,)
    ready, text = _readiness_of(app)
    assert ready and "tsu b: compromised" in text and "tsu a: active" in text


def _readiness_of(app: TimeStampApp) -> tuple[bool, str]:
    return app._readiness()
