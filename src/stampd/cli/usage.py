"""`stampd usage report`: granted tokens per subscriber and TSU over a period, for billing (issue 6)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import click

from stampd.cli.options import config_option, parse_instant
from stampd.config import load_config
from stampd.records.usage import UsageRow, usage_report

COLUMNS = ("subscriber", "tsu", "tokens", "first", "last")


@click.group("usage")
def command() -> None:
    """Report the subscribers' usage."""


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000).isoformat()


def _as_dict(row: UsageRow) -> dict[str, str | int]:
    return {
        "subscriber": row.subscriber,
        "tsu": row.tsu,
        "tokens": row.tokens,
        "first": _iso(row.first_us),
        "last": _iso(row.last_us),
    }


@command.command("report")
@config_option
@click.option("--from", "from_text", required=True, metavar="DATE", help="Start (inclusive), e.g. 2026-11-01 (UTC).")
@click.option("--to", "to_text", required=True, metavar="DATE", help="End (exclusive), e.g. 2026-12-01 (UTC).")
@click.option("--subscriber", metavar="NAME", help="Only this subscriber.")
@click.option("--format", "output", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
def report(config_file: str, from_text: str, to_text: str, subscriber: str | None, output: str) -> None:
    """Tokens granted to subscribers with genTime in [--from, --to), by subscriber and TSU, counted from the
    issued tokens themselves: columns subscriber, tsu, tokens, first, last (genTimes, UTC)."""
    from_us, to_us = parse_instant(from_text, "--from"), parse_instant(to_text, "--to")
    if to_us <= from_us:
        raise click.BadParameter("must be after --from", param_hint="--to")
    rows = [_as_dict(r) for r in usage_report(load_config(config_file).records.url, from_us, to_us, subscriber)]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    click.echo(buffer.getvalue(), nl=False)
