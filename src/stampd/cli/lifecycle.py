"""`stampd tsu compromise`, `stampd terminate` and `stampd reload`: changing what a running TSA serves.

Compromise and termination stop TSUs for good (RFC 3628 §7.4.8-7.4.9; SPEC OPS-10, OPS-11).

Both commit the TSU's new state to the records before they return; from that commit on, the records database
refuses every token record of that TSU, so no serving process or node can return another token from it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from stampd.certprofile import key_fingerprint
from stampd.cli.options import config_option
from stampd.cli.records import export_all
from stampd.config import Config, KeyConfig, TsuConfig, load_config, pid_file_for
from stampd.errors import ConfigError, StampdError
from stampd.oids import HASH_BY_OID
from stampd.records.store import RecordStore
from stampd.signers.backends import secret
from stampd.signers.pkcs11 import destroy_key


def _tsu(config: Config, name: str) -> TsuConfig:
    for tsu in config.tsus:
        if tsu.name == name:
            return tsu
    raise ConfigError(f"{config.source}: no TSU named {name!r} (known: {', '.join(t.name for t in config.tsus)})")


def _key_fingerprints(tsu: TsuConfig) -> list[str]:
    """The TSU's keys, by their certificates' public keys: a stopped key stays refused under any TSU name."""
    paths = [tsu.certificate, *([tsu.next.certificate] if tsu.next is not None else [])]
    found = []
    for path in paths:
        try:
            found.append(key_fingerprint(x509.load_pem_x509_certificate(path.read_bytes())))
        except (OSError, ValueError):
            continue
    return found


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 time such as 2026-11-01T00:00:00Z, not {text!r}") from None
    if value.tzinfo is None:
        raise click.BadParameter("the time must name its time zone (e.g. end in Z)")
    return value.astimezone(UTC)


@click.command("compromise")
@config_option
@click.argument("name")
@click.option("--since", "since_text", required=True, metavar="TIME", help="Earliest possible misuse (ISO 8601).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the affected tokens here.")
@click.option("--reason", default="key compromise", show_default=True)
def compromise(config_file: str, name: str, since_text: str, report: Path | None, reason: str) -> None:
    """Stop TSU NAME at once, in every process, and report the tokens it issued since TIME (SPEC OPS-10)."""
    config = load_config(config_file)
    tsu = _tsu(config, name)
    since = _instant(since_text)
    if since > datetime.now(UTC):
        raise click.BadParameter("--since is in the future: a compromise is dated when the key may first have leaked")
    report_fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) if report is not None else None
    store = RecordStore(config.records.url, create=False)
    try:
        earlier = store.tsu_states().get(name)
        if earlier is not None and earlier.state == "compromised" and earlier.since_us is not None:
            since = min(since, datetime.fromtimestamp(earlier.since_us / 1e6, UTC))  # never narrow the window
        since_us = int(since.timestamp() * 1_000_000)
        detail = {"since": since.isoformat(), "reason": reason, "key_fingerprints": _key_fingerprints(tsu)}
        state = store.stop_tsu(name, "compromised", since_us=since_us, reason=reason, detail=detail)
        affected = store.tokens_between(name, since_us)
    finally:
        store.close()
    click.echo(f"TSU {name} is compromised as of {datetime.fromtimestamp(state.at_us / 1e6, UTC).isoformat()}")
    click.echo(f"{len(affected)} tokens were issued by it since {since.isoformat()}")
    if report is not None:
        rows = [
            {
                "serial": str(r.serial),
                "serial_hex": f"0x{r.serial:x}",
                "gen_time": r.gen_time,
                "hash_algorithm": HASH_BY_OID[r.hash_oid].name if r.hash_oid in HASH_BY_OID else r.hash_oid,
                "imprint": r.imprint.hex(),
                "policy": r.policy,
            }
            for r in affected
        ]
        document = {"tsu": name, "compromised_since": since.isoformat(), "reason": reason, "tokens": rows}
        assert report_fd is not None
        with os.fdopen(report_fd, "w") as f:
            f.write(json.dumps(document, indent=2) + "\n")
        click.echo(f"report: {report}")


@click.command("terminate")
@config_option
@click.option(
    "--export",
    "export_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the self-verifying records archive of every record (`stampd records verify-archive`).",
)
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write a copy of the SQLite records database.",
)
@click.option("--destroy-keys", is_flag=True, help="Also destroy every TSU's private key (asks to confirm).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def terminate(config_file: str, export_file: Path | None, archive: Path | None, destroy_keys: bool, yes: bool) -> None:
    """Stop every TSU for good, export the records (--export, --archive or both), and optionally destroy the keys
    (SPEC OPS-11)."""
    config = load_config(config_file)
    names = [t.name for t in config.tsus]
    targets = [t for t in (export_file, archive) if t is not None]
    if not targets:
        raise click.UsageError("give --export FILE (a self-verifying archive) and/or --archive FILE (SQLite copy)")
    if archive is not None and not config.records.url.startswith("sqlite:"):
        raise StampdError("--archive copies SQLite records only: use --export for PostgreSQL")
    for target in targets:
        if target.exists() or not target.parent.is_dir():
            raise StampdError(f"{target} exists or its directory does not; choose a new file for the records archive")
    shown = str(export_file if export_file is not None else archive)
    if not yes:
        click.confirm(f"Terminate {', '.join(names)} for good? They will never issue again", abort=True)
    store = RecordStore(config.records.url, create=False)
    try:
        states = store.tsu_states()
        for tsu_config in config.tsus:
            name = tsu_config.name
            if name in states and states[name].state == "compromised":
                store.record_event("tsu.terminated", {"archive": shown, "state kept": "compromised"}, tsu=name)
            else:
                detail = {"archive": shown, "key_fingerprints": _key_fingerprints(tsu_config)}
                store.stop_tsu(name, "terminated", since_us=None, reason="termination", detail=detail)
            click.echo(f"TSU {name} is terminated")
        if export_file is not None:
            counts = export_all(config, export_file)
            store.record_event("records.exported", {"archive": str(export_file), "reason": "termination", **counts})
            click.echo(f"records archive: {export_file} ({counts['tokens']} tokens, {counts['events']} events)")
        if archive is not None:
            _export(config, archive)
            store.record_event("records.exported", {"archive": str(archive), "reason": "termination"})
            click.echo(f"records database copy: {archive}")
        if destroy_keys:
            if not yes:
                click.confirm("Destroy every TSU private key? This cannot be undone", abort=True)
            for tsu in config.tsus:
                keys = [tsu.key, *([tsu.next.key] if tsu.next is not None else [])]
                for key in keys:
                    detail = _destroy_key(tsu.name, key)
                    store.record_event("key.destroyed", detail, tsu=tsu.name)
                    click.echo(f"key of {tsu.name} destroyed ({detail['location']})")
    finally:
        store.close()


def _export(config: Config, archive: Path) -> None:
    """A consistent copy of the SQLite records (the online backup API), created 0600."""
    source = config.records.url.removeprefix("sqlite:///")
    if source == config.records.url:
        raise StampdError("exporting non-SQLite records is done with the database's own tools")
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with sqlite3.connect(source) as src, sqlite3.connect(archive) as dst:
        src.backup(dst)


def _destroy_key(name: str, key: KeyConfig) -> dict[str, Any]:
    if key.backend == "pkcs11":
        assert key.module and key.token_label and key.key_label
        count = destroy_key(
            module=key.module,
            token_label=key.token_label,
            key_label=key.key_label,
            pin=secret(key.pin_file, key.pin_env, f"tsu.{name}.key.pin_env"),
        )
        return {"backend": "pkcs11", "location": f"{key.token_label}/{key.key_label}", "objects": count}
    assert key.path is not None
    if not key.path.exists():
        return {"backend": "file", "location": str(key.path), "note": "already gone"}
    size = key.path.stat().st_size
    with key.path.open("r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    key.path.unlink()
    return {"backend": "file", "location": str(key.path)}


@click.command("reload")
@config_option
def reload(config_file: str) -> None:
    """Make the running server load its TSUs, keys and certificates again (SIGHUP), without dropping requests."""
    pid_file = pid_file_for(Path(config_file))
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise StampdError(f"no running server for {config_file} (no readable {pid_file})") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise StampdError(f"the server recorded in {pid_file} (pid {pid}) is not running") from None
    click.echo(f"asked the server (pid {pid}) to reload; its log and the records say whether it did")
