"""`stampd tokens`: read issued tokens back from the records (SPEC OPS-09)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from stampd.cli.options import config_option
from stampd.config import load_config
from stampd.model import TokenRecord
from stampd.oids import HASH_BY_OID
from stampd.records.store import RecordStore


@click.group("tokens")
def command() -> None:
    """Look up issued tokens in the records."""


def _serial(text: str) -> int:
    try:
        value = int(text[2:], 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither decimal nor 0x-prefixed hexadecimal") from None
    if value <= 0:
        raise click.BadParameter("serial numbers are positive")
    return value


def _as_dict(record: TokenRecord) -> dict[str, Any]:
    algorithm = HASH_BY_OID.get(record.hash_oid)
    return {
        "serial": str(record.serial),
        "serial_hex": f"0x{record.serial:x}",
        "gen_time": record.gen_time,
        "gen_time_iso": datetime.fromtimestamp(record.gen_time_ns / 1e9, UTC).isoformat(timespec="microseconds"),
        "tsu": record.tsu,
        "policy": record.policy,
        "hash_algorithm": algorithm.name if algorithm else record.hash_oid,
        "imprint": record.imprint.hex(),
        "nonce": None if record.nonce is None else str(record.nonce),
        "requester": record.requester,
        "token_size": len(record.token),
    }


def _print(records: list[TokenRecord], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_as_dict(r) for r in records], indent=2))
        return
    _print_text(records)


def _print_text(records: list[TokenRecord]) -> None:
    for i, record in enumerate(records):
        if i:
            click.echo()
        for key, value in _as_dict(record).items():
            click.echo(f"{key + ':':<15}{'' if value is None else value}")


@command.command("show")
@config_option
@click.argument("serial")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--der", "der_file", type=click.Path(dir_okay=False), help="Also write the token's DER reply here.")
def show(config_file: str, serial: str, as_json: bool, der_file: str | None) -> None:
    """Show the token with SERIAL (decimal or 0x-prefixed hexadecimal); exit status 1 if there is none."""
    store = RecordStore(load_config(config_file).records.url, create=False)
    record = store.token_by_serial(_serial(serial))
    store.close()
    if record is None:
        click.echo(f"no token with serial {serial}", err=True)
        sys.exit(1)
    if der_file:
        with open(der_file, "wb") as f:
            f.write(record.token)
    if as_json:
        click.echo(json.dumps(_as_dict(record), indent=2))
    else:
        _print_text([record])


@command.command("find")
@config_option
@click.option("--imprint", required=True, metavar="HEX", help="The hashed message of the request, in hexadecimal.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def find(config_file: str, imprint: str, as_json: bool) -> None:
    """List the tokens issued for an imprint; exit status 1 if there are none."""
    try:
        digest = bytes.fromhex(imprint)
    except ValueError:
        raise click.BadParameter("expected hexadecimal", param_hint="--imprint") from None
    store = RecordStore(load_config(config_file).records.url, create=False)
    records = store.tokens_by_imprint(digest)
    store.close()
    if not records:
        click.echo(f"no token for imprint {imprint}", err=True)
        sys.exit(1)
    _print(records, as_json)
