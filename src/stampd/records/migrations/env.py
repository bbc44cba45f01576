"""Alembic environment of the records: the connection (or the URL) is handed over programmatically by
:mod:`stampd.records.migrate`, so no alembic.ini is needed."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from stampd.records.engine import open_engine
from stampd.records.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no records URL: use stampd.records.migrate or `stampd db upgrade`")
    engine = open_engine(url, create=True, pooled=False)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the records migrations run online only (`stampd db upgrade`)")
run_migrations()
