"""`stampd audit`: check the evidence in the records (hash chains of tokens and events, signed checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from stampd.cli.options import config_option
from stampd.config import RecordsConfig, load_config
from stampd.errors import ConfigError
from stampd.records.audit import AuditReport, audit_records
from stampd.records.checkpoint import PublicKey, load_public_key
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file


@click.group("audit")
def command() -> None:
    """Check the records' evidence."""


def _public_key(records: RecordsConfig, pem_file: Path | None) -> PublicKey | None:
    """--public-key, else the public half of records.checkpoint_key; None if neither is there."""
    if pem_file is not None:
        try:
            return load_public_key(pem_file.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--public-key {pem_file}: not a readable PEM public key or certificate: {e}") from e
    if records.checkpoint_key is None or records.checkpoint_passphrase_file is None:
        return None
    key = load_encrypted_key(records.checkpoint_key, read_passphrase_file(records.checkpoint_passphrase_file))
    return key.public_key()


def _echo(report: AuditReport) -> None:
    for name, count in report.unchained.items():
        if count:
            click.echo(f"{name}: {count} unchained entries (recorded before the chains existed; not verifiable)")
    for chain in report.chains:
        mark = "FAILED" if chain.problem else "ok"
        signed = f", checkpointed up to seq {chain.checkpointed_seq}" if chain.checkpointed_seq else ""
        click.echo(
            f"  [{mark:>6}] {chain.table} chain {chain.chain}: {chain.count} entries, "
            f"head seq {chain.head_seq} {chain.head_hash}{signed}"
        )
    click.echo(f"checkpoints verified: {report.checkpoints}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    click.echo("Audit: OK" if report.ok else "Audit: FAILED")


@command.command("verify")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--public-key",
    "public_key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM public key (or certificate) of the checkpoint key; default: that of records.checkpoint_key.",
)
def verify(config_file: str, as_json: bool, public_key_file: Path | None) -> None:
    """Walk every hash chain of tokens and events, and check every signed checkpoint; name the first bad entry
    of each chain. Exit status 0 when everything verifies, 1 otherwise. Reads only."""
    records = load_config(config_file).records
    report = audit_records(records.url, _public_key(records, public_key_file))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _echo(report)
    if not report.ok:
        raise click.exceptions.Exit(1)
