"""Entry point: one click group; every StampdError is presented once, here."""

from __future__ import annotations

import sys

import click

from stampd.errors import StampdError


@click.group()
@click.version_option(package_name="stampd")
def cli() -> None:
    """stampd: an RFC 3161 Time-Stamping Authority, its client and its verifier."""


def main() -> None:
    try:
        status = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except StampdError as e:
        click.echo(f"stampd: error: {e}", err=True)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


from stampd.cli import audit as _audit  # noqa: E402
from stampd.cli import config as _config  # noqa: E402
from stampd.cli import db as _db  # noqa: E402
from stampd.cli import init as _init  # noqa: E402
from stampd.cli import lifecycle as _lifecycle  # noqa: E402
from stampd.cli import records as _records  # noqa: E402
from stampd.cli import serve as _serve  # noqa: E402
from stampd.cli import stamp as _stamp  # noqa: E402
from stampd.cli import subscribers as _subscribers  # noqa: E402
from stampd.cli import tokens as _tokens  # noqa: E402
from stampd.cli import tsu as _tsu  # noqa: E402
from stampd.cli import usage as _usage  # noqa: E402
from stampd.cli import verify as _verify  # noqa: E402

for _command in (
    _init.command,
    _serve.command,
    _tokens.command,
    _tsu.command,
    _stamp.command,
    _verify.command,
    _lifecycle.terminate,
    _lifecycle.reload,
    _db.command,
    _audit.command,
    _records.command,
    _subscribers.command,
    _usage.command,
    _config.command,
):
    cli.add_command(_command)
_tsu.command.add_command(_lifecycle.compromise)
