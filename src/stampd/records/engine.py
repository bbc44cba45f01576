"""Opening a records database: the URL's driver, the SQLite file's mode and pragmas, in one place for the store
and the migrations."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

BUSY_TIMEOUT_MS = 200
"""How long a commit waits for another process's write lock. It waits on the event loop, so it is short: a lock
held longer (a backup, a stuck process) fails the waiting requests with systemFailure instead of freezing the
worker."""

MASK = "***"
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pass", "sslpassword"})


def records_url(url: str) -> URL:
    """``url`` with the driver stampd uses: ``postgresql://`` means psycopg 3 (SQLAlchemy's default is psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str) -> str:
    """``url`` without its password, for messages, logs and `stampd config show`: a password hides in the user
    information (``user:secret@host``) or in a query parameter (libpq reads ``?password=``)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(f"//{parts.netloc}", f"//{userinfo.partition(':')[0]}:{MASK}@{host}", 1)
    if parts.query:
        query = "&".join(
            f"{key}={MASK}" if key.lower() in _SECRET_QUERY_KEYS else f"{key}{sep}{value}"
            for key, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
        )
        url = url.replace(f"?{parts.query}", f"?{query}", 1)
    return url


def sqlite_file(engine: Engine) -> str | None:
    """The SQLite database file of ``engine``, or None (PostgreSQL, or an in-memory database)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    return database if database and database != ":memory:" else None


def _create_private_file(path: str, create: bool) -> None:
    """Records hold requesters' addresses: the database is created 0600 (SQLite gives its WAL the same mode)."""
    if os.path.exists(path):
        return
    if not create:
        raise FileNotFoundError(f"no records database at {path}")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite(engine: Engine) -> None:
    """WAL with a full sync at every commit: a committed record survives power loss; readers never block."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()


def open_engine(url: str, *, create: bool, pooled: bool = True) -> Engine:
    """An engine on the records at ``url``. A missing SQLite file is created 0600 with ``create``, and is an error
    (FileNotFoundError) without it. Raises SQLAlchemy's errors, ImportError (no driver) or OSError."""
    url_object = records_url(url)
    options: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if url_object.get_backend_name() == "sqlite":
        # The token connection runs its statements on the event loop and its COMMIT (the fsync) in the store's
        # commit thread, one at a time (RecordStore._flush); sqlite3 only needs to be told that is allowed.
        options["connect_args"] = {"check_same_thread": False}
    engine = create_engine(url_object, **options)
    database = sqlite_file(engine)
    if database is not None:
        _create_private_file(database, create)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine
