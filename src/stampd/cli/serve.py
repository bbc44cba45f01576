"""`stampd serve`: run the TSA over HTTP."""

from __future__ import annotations

import contextlib
import logging.config
import os

import click

from stampd.app import create_app
from stampd.cli.options import config_option
from stampd.config import load_config, pid_file_for, split_listen
from stampd.logs import log_config
from stampd.server.run import LOG_CONFIG, serve


@click.command("serve")
@config_option
@click.option("--listen", metavar="HOST:PORT", help="Override server.listen.")
@click.option("--workers", type=click.IntRange(1, 256), help="Override server.workers.")
def command(config_file: str, listen: str | None, workers: int | None) -> None:
    """Serve RFC 3161 time-stamp requests over HTTP until interrupted."""
    logging.config.dictConfig(LOG_CONFIG)
    config = load_config(config_file)
    logging.config.dictConfig(log_config(config.server.log_format))
    try:
        host, port = split_listen(listen) if listen else (config.server.host, config.server.port)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    app = create_app(config)
    pid_file = pid_file_for(config.source)
    try:
        pid_file.write_text(f"{os.getpid()}\n")
    except OSError as e:  # a read-only configuration mount: `stampd reload` then needs the pid some other way
        logging.getLogger("stampd").warning("cannot write %s (%s): send SIGHUP to reload", pid_file, e.strerror)
    try:
        serve(config, app, host=host, port=port, workers=workers or config.server.workers)
    finally:
        with contextlib.suppress(OSError):
            pid_file.unlink()
