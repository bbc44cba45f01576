"""`stampd db`: the records database's schema (Alembic revisions shipped with stampd)."""

from __future__ import annotations

import click

from stampd.cli.options import config_option
from stampd.config import load_config
from stampd.records.migrate import current_revision, head_revision, upgrade


@click.group("db")
def command() -> None:
    """Manage the schema of the records database (records.url)."""


@command.command("upgrade")
@config_option
def upgrade_command(config_file: str) -> None:
    """Bring the records schema to the revision this stampd needs (creates the tables on a new database; running
    it again changes nothing). Run it before `stampd serve` after installing a new stampd."""
    url = load_config(config_file).records.url
    before = current_revision(url)
    head = upgrade(url)
    if before == head:
        click.echo(f"the records schema is already at {head}")
    else:
        click.echo(f"the records schema is now at {head} (was {before or 'empty'})")


@command.command("current")
@config_option
def current_command(config_file: str) -> None:
    """Print the records schema revision and whether this stampd can serve on it; exit status 1 if not."""
    url = load_config(config_file).records.url
    current, head = current_revision(url), head_revision()
    if current == head:
        click.echo(f"{current} (head)")
        return
    click.echo(f"{current or 'empty'} (this stampd needs {head}: run `stampd db upgrade -c {config_file}`)")
    raise click.exceptions.Exit(1)
