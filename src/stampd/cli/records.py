"""`stampd records purge|export|verify-archive`: retention and archives of the records (issue "Evidence that
scales", item 4; RFC 3628 §7.4.11; SPEC OPS-08, OPS-09, OPS-11)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from stampd.cli.options import INSTANT_RANGE_US, config_option, parse_instant
from stampd.config import Config, RecordsConfig, load_config
from stampd.errors import ConfigError
from stampd.records.archive import (
    ArchiveCertificate,
    ArchiveReport,
    ExportRequest,
    export_archive,
    iso,
    verify_archive,
)
from stampd.records.checkpoint import CheckpointSigner, PublicKey, load_public_key
from stampd.records.retention import DEFAULT_BATCH_ROWS, CheckpointKey, PurgeResult, purge_records
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file

WHOLE_RANGE_US = INSTANT_RANGE_US
"""[from, to) of an archive of everything (`stampd terminate`)."""


@click.group("records")
def command() -> None:
    """Retention and archives of the records."""


def checkpoint_key(records: RecordsConfig) -> CheckpointKey | None:
    """records.checkpoint_key, both halves; None when none is configured."""
    if records.checkpoint_key is None or records.checkpoint_passphrase_file is None:
        return None
    key = load_encrypted_key(records.checkpoint_key, read_passphrase_file(records.checkpoint_passphrase_file))
    return CheckpointKey(CheckpointSigner(key), key.public_key())


def _now_us() -> int:
    return time.time_ns() // 1000


def _echo_purge(result: PurgeResult) -> None:
    counts = result.counts()
    verb = "would remove" if result.dry_run else "removed"
    click.echo(f"cut-off: {iso(result.cutoff_us)} (records.retention {result.retention_us / 86_400e6:g} days)")
    steps = f"{result.steps} step{'s' if result.steps != 1 else ''}"
    click.echo(f"{verb}: {counts['tokens']} tokens, {counts['events']} events, in {steps}")
    for cut in result.cuts:
        click.echo(f"  {cut.table} chain {cut.chain}: seq {cut.from_seq}-{cut.through_seq}")
    for table, kept in result.kept.items():
        if kept:
            click.echo(f"kept: {kept} older {table} recorded after a younger entry of their chain")
    if not result.dry_run:
        click.echo(
            f"recorded: {result.steps} records.purged events in events chain {result.event_chain}; "
            f"the longest step held the records for {result.longest_step_s * 1000:.0f} ms"
        )
        if result.checkpoint_ids:
            click.echo(f"checkpoints {result.checkpoint_ids[0]}-{result.checkpoint_ids[-1]} sign them")


@command.command("purge")
@config_option
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_ROWS,
    show_default=True,
    help="Rows removed per transaction (step).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def purge(config_file: str, dry_run: bool, batch_rows: int, as_json: bool) -> None:
    """Remove the tokens and events older than records.retention, in steps of at most --batch-rows rows, each its
    own transaction that records itself (with the anchors that keep every chain verifiable) and, with
    records.checkpoint_key, is signed. The serving processes go on committing between the steps: a purge can run
    while they serve, and a purge that stops halfway leaves records that verify."""
    records = load_config(config_file).records
    result = purge_records(
        records.url,
        retention_us=records.retention_us,
        now_us=_now_us(),
        checkpoint=None if dry_run else checkpoint_key(records),
        dry_run=dry_run,
        batch_rows=batch_rows,
    )
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "event_chain": result.event_chain, **result.detail()}, indent=2))
    else:
        _echo_purge(result)


def archive_certificates(config: Config) -> list[ArchiveCertificate]:
    """Each TSU's certificate (and the ones it replaced), chain, trust anchor, and its next key's certificate."""
    found: list[ArchiveCertificate] = []

    def add(member: str, path: Path, trust_anchor: bool = False) -> None:
        try:
            found.append(ArchiveCertificate(member, path.read_bytes(), trust_anchor))
        except OSError as e:
            raise ConfigError(f"{config.source}: cannot read {path} for the archive: {e.strerror}") from None

    for tsu in config.tsus:
        add(f"{tsu.name}/certificate.pem", tsu.certificate)
        for previous in sorted(tsu.certificate.parent.glob(f"{tsu.certificate.name}.replaced-*")):
            add(f"{tsu.name}/{previous.name}.pem", previous)
        for i, chain in enumerate(tsu.chain):
            add(f"{tsu.name}/chain-{i}.pem", chain)
        add(f"{tsu.name}/trust-anchor.pem", tsu.trust_anchor, trust_anchor=True)
        if tsu.next is not None:
            add(f"{tsu.name}/next-certificate.pem", tsu.next.certificate)
            for i, chain in enumerate(tsu.next.chain):
                add(f"{tsu.name}/next-chain-{i}.pem", chain)
    return found


def export_all(config: Config, target: Path) -> dict[str, Any]:
    """The archive of every record (`stampd terminate`); returns the counts."""
    return export_archive(config.records.url, target, _export_request(config, *WHOLE_RANGE_US)).counts


def _export_request(config: Config, from_us: int, to_us: int) -> ExportRequest:
    return ExportRequest(from_us, to_us, archive_certificates(config), checkpoint_key(config.records), _now_us())


@command.command("export")
@config_option
@click.option("--from", "from_text", required=True, metavar="DATE", help="Start (inclusive), ISO 8601, UTC default.")
@click.option("--to", "to_text", required=True, metavar="DATE", help="End (exclusive), ISO 8601, UTC default.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def export(config_file: str, from_text: str, to_text: str, file: Path) -> None:
    """Write the tokens and events of [--from, --to) to FILE: a self-verifying archive (ZIP) with the chain
    anchors, checkpoints, certificates and trust anchors; check it with `stampd records verify-archive FILE`."""
    from_us, to_us = parse_instant(from_text, "--from"), parse_instant(to_text, "--to")
    if from_us >= to_us:
        raise click.BadParameter(
            f"{iso(to_us)} is not after --from {iso(from_us)}: the range is [--from, --to)", param_hint="--to"
        )
    config = load_config(config_file)
    summary = export_archive(config.records.url, file, _export_request(config, from_us, to_us))
    counts = summary.counts
    click.echo(
        f"{file}: {counts['tokens']} tokens, {counts['events']} events, {counts['checkpoints']} checkpoints, "
        f"{summary.segments} chain segments{', signed' if summary.signed else ' (no checkpoint key: unsigned)'}"
    )


def _echo_archive(report: ArchiveReport) -> None:
    if report.range:
        click.echo(f"range:        [{report.range[0]}, {report.range[1]})")
    for name, count in report.counts.items():
        click.echo(f"{name + ':':<14}{count}")
    click.echo(f"segments:     {report.segments}")
    click.echo(f"checkpoints verified: {report.checkpoints}; entries they cover: {report.signed_entries}")
    key = report.checkpoint_key_sha256
    click.echo(
        f"manifest signed: {'yes, checkpoint key SPKI SHA-256 ' + key if report.manifest_signed and key else 'no'}"
    )
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    click.echo("Archive: OK" if report.ok else "Archive: FAILED")


@command.command("verify-archive")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--public-key",
    "public_key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM public key (or certificate) the archive must be signed with (its checkpoint key).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def verify_archive_command(file: Path, public_key_file: Path | None, as_json: bool) -> None:
    """Check an archive offline (no configuration, no database): member hashes, the manifest signature, hash
    chains and their anchors, checkpoint signatures, and every token. Exit status 0 when all is good, 1 with
    the first bad item named."""
    pinned: PublicKey | None = None
    if public_key_file is not None:
        try:
            pinned = load_public_key(public_key_file.read_bytes())
        except (OSError, ValueError) as e:
            raise click.BadParameter(
                f"not a readable PEM public key or certificate: {e}", param_hint="--public-key"
            ) from e
    report = verify_archive(file, pinned_key=pinned)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _echo_archive(report)
    if not report.ok:
        raise click.exceptions.Exit(1)
