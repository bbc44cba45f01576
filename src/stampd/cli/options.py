"""Options shared by the commands that work on a TSA's state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from stampd.config import CONFIG_ENV, DEFAULT_CONFIG

config_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "-c",
    "--config",
    "config_file",
    envvar=CONFIG_ENV,
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help=f"The TSA's configuration file (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}).",
)
