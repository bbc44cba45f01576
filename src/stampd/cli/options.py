"""Options shared by the commands that work on a TSA's state, and the one reading of the dates they take."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
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

INSTANT_RANGE_US = (0, 253_370_764_800_000_000)
"""[1970-01-01, 9999-01-01): the instants a date option accepts; records hold nothing earlier or later."""


def parse_instant(text: str, option: str) -> int:
    """An ISO 8601 date or date-time (UTC when it names no zone; ``Z`` also after a bare date), in microseconds
    since the epoch, within :data:`INSTANT_RANGE_US`; BadParameter naming ``option`` otherwise."""
    try:
        value = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise click.BadParameter(
            f"expected an ISO 8601 date or time such as 2026-01-01 or 2026-01-01T12:00:00+01:00, not {text!r}",
            param_hint=option,
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    instant = (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    if not INSTANT_RANGE_US[0] <= instant <= INSTANT_RANGE_US[1]:
        raise click.BadParameter(f"{text!r} is outside 1970-01-01 to 9999-01-01 (UTC)", param_hint=option)
    return instant
