"""`stampd config check|show`: validate a configuration as start-up would, without serving; print the effective
configuration with every default filled in and no secret in it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from stampd.app import check_tsu
from stampd.cli.options import config_option
from stampd.config import Config, load_config, to_mapping
from stampd.errors import StampdError
from stampd.records.engine import mask_url
from stampd.records.store import RecordStore
from stampd.server.run import tls_options

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@click.group("config")
def command() -> None:
    """Check or show a configuration file."""


@command.command("check")
@click.argument("config_file", metavar="FILE", type=click.Path(dir_okay=False))
def check_command(config_file: str) -> None:
    """Check FILE as `stampd serve` does at start-up, without serving and without recording anything.

    \b
    It checks, in this order:
    - every table and field (types, ranges, unknown settings);
    - the TLS certificate, key and client CA, when [server] sets them;
    - the records database: it opens, and its schema is at the revision this stampd needs;
    - each TSU that is not compromised or terminated: its key (and its next key until that takes over) opens,
      matches its certificate, passes the certificate profile and the chain to the trust anchor, and signs a
      self-test token that verifies.
    The usage ledger ([access] ledger) is not contacted.

    Prints one line and exits with status 0, or prints the first problem, naming the file and the field, and
    exits with status 1.
    """
    try:
        config = load_config(config_file)
        summary = _check(config)
    except StampdError as e:
        text = str(e)
        click.echo(f"stampd: error: {text if text.startswith(config_file) else f'{config_file}: {text}'}", err=True)
        raise click.exceptions.Exit(1) from None
    click.echo(f"{config_file}: OK: {summary}")


def _check(config: Config) -> str:
    """Start-up's checks of ``config``; a sentence saying what passed."""
    tls_options(config.server.tls)
    store = RecordStore(config.records.url, create=False)
    try:
        store.check_schema(config.source)
        states = store.tsu_states()
        dialect = store.dialect
    finally:
        store.close()
    keys, stopped = [], []
    for tsu in config.tsus:
        if tsu.name in states:
            stopped.append(f"{tsu.name} ({states[tsu.name].state}, key not opened)")
            continue
        try:
            check_tsu(tsu, config.clock.accuracy_us)
        except StampdError as e:
            if str(e).startswith(f"tsu.{tsu.name}"):
                raise
            raise type(e)(f"tsu.{tsu.name}: {e}") from e  # a key backend's error that does not say whose key
        keys.append(tsu.name)
    parts = [f"{len(config.tsus)} TSU{'s' if len(config.tsus) != 1 else ''}"]
    if keys:
        parts.append(f"keys, certificates, chains and self-test tokens of {', '.join(keys)}")
    if stopped:
        parts.append(f"stopped: {', '.join(stopped)}")
    parts.append(f"records ({dialect}) at the expected schema")
    if config.server.tls is not None:
        parts.append("TLS files")
    return "; ".join(parts)


@command.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def show_command(config_file: str, as_json: bool) -> None:
    """Print the effective configuration: every setting with its default filled in and paths resolved.

    Passphrases and PINs appear only as what the configuration references (a file or an environment variable),
    never their content; a password in a URL (records.url, the usage ledger) is shown as ***.
    """
    mapping = mask_secrets(to_mapping(load_config(Path(config_file).absolute())))
    click.echo(json.dumps(mapping, indent=2) if as_json else toml_text(mapping), nl=as_json)


def mask_secrets(value: Any) -> Any:
    """``value`` with the password of every URL in it replaced by ***."""
    if isinstance(value, dict):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def toml_text(mapping: dict[str, Any]) -> str:
    """``mapping`` as TOML: the values of a table, then its sub-tables (``[tsu.NAME]``, ``[tsu.NAME.key]``)."""
    return "\n".join(_table(mapping, ())).rstrip("\n") + "\n"


def _table(mapping: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    values = {key: value for key, value in mapping.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in mapping.items() if isinstance(value, dict)}
    lines: list[str] = []
    if values or (path and not tables):
        if path:
            lines.append(f"[{'.'.join(_key(part) for part in path)}]")
        lines.extend(f"{_key(key)} = {_value(value)}" for key, value in values.items())
        lines.append("")
    for key, table in tables.items():
        lines.extend(_table(table, (*path, key)))
    return lines


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return _string(str(value))


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = "".join(
        "\\" + char if char in '"\\' else f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char
        for char in text
    )
    return f'"{escaped}"'
