"""The composition root in-process: start-up and stop events, key life-cycle events (SPEC OPS-05, OPS-08)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner

from stampd.app import create_app
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.records.store import RecordStore


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
