"""The records schema's revisions (Alembic, configured here so that no alembic.ini is needed): apply them, and
say which one a database is at (SPEC OPS-09)."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError

from stampd.errors import RecordingError
from stampd.records.engine import mask_url, open_engine

logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)  # its INFO lines would fill the server log

SCRIPT_LOCATION = "stampd.records:migrations"
"""The migrations ship inside the package (package data), found by package name wherever it is installed."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    """The revision this stampd's code expects."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the records migrations have no revision"
    return head


def upgrade(url: str) -> str:
    """Bring the records at ``url`` to the head revision (creating a missing SQLite file, mode 0600); idempotent.
    Returns the head revision."""
    try:
        engine = open_engine(url, create=True, pooled=False)
        try:
            with engine.begin() as connection:
                config = _config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        finally:
            engine.dispose()
    except (SQLAlchemyError, CommandError, ImportError, OSError) as e:
        raise RecordingError(f"cannot upgrade the records at {mask_url(url)}: {e}") from e
    return head_revision()


def current_revision(url: str) -> str | None:
    """The revision of the records at ``url``; None for a database without a schema (or a missing SQLite file)."""
    try:
        engine = open_engine(url, create=False, pooled=False)
    except FileNotFoundError:
        return None
    except (SQLAlchemyError, ImportError, OSError) as e:
        raise RecordingError(f"cannot open the records at {mask_url(url)}: {e}") from e
    try:
        with engine.connect() as connection:
            heads = MigrationContext.configure(connection).get_current_heads()
    except SQLAlchemyError as e:
        raise RecordingError(f"cannot read the schema revision of the records at {mask_url(url)}: {e}") from e
    finally:
        engine.dispose()
    if len(heads) > 1:
        return "+".join(sorted(heads))
    return heads[0] if heads else None

