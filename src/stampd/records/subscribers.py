"""The subscribers in the records database (`stampd subscribers ...`; issue 6).

Every change is written together with its event (``subscriber.added``, ``subscriber.disabled``,
``subscriber.enabled``) in one transaction, the event chained like every other (stampd.records.chain) under a
chain of this store's own, so `stampd audit verify` checks the history of the subscribers too. No secret enters
the store: an API token only as its SHA-256, a basic password only as its scrypt hash; and no hash enters an event.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from ipaddress import ip_network
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from stampd.access import Quota, Subscriber, SubscriberDirectory
from stampd.errors import RecordingError
from stampd.records.chain import ChainHead, event_entry_hash, new_chain_id
from stampd.records.engine import mask_url, open_engine
from stampd.records.schema import events, subscribers
from stampd.records.usage import serialise_sqlite_writers


def _to_row(subscriber: Subscriber, created_at_us: int) -> dict[str, Any]:
    return {
        "name": subscriber.name,
        "enabled": subscriber.enabled,
        "networks": json.dumps([str(n) for n in subscriber.networks]),
        "token_sha256": subscriber.token_sha256,
        "basic_user": subscriber.basic_user,
        "basic_hash": subscriber.basic_hash,
        "cert_sha256": json.dumps([f.hex() for f in subscriber.cert_sha256]),
        "quotas": json.dumps([str(q) for q in subscriber.quotas]),
        "rate_per_s": subscriber.rate_per_s,
        "tsus": None if subscriber.tsus is None else json.dumps(sorted(subscriber.tsus)),
        "created_at_us": created_at_us,
    }


def _from_row(row: Any) -> Subscriber:
    return Subscriber(
        name=row.name,
        enabled=bool(row.enabled),
        networks=tuple(ip_network(n) for n in json.loads(row.networks)),
        token_sha256=None if row.token_sha256 is None else bytes(row.token_sha256),
        basic_user=row.basic_user,
        basic_hash=row.basic_hash,
        cert_sha256=tuple(bytes.fromhex(f) for f in json.loads(row.cert_sha256)),
        quotas=tuple(Quota.parse(q) for q in json.loads(row.quotas)),
        rate_per_s=row.rate_per_s,
        tsus=None if row.tsus is None else frozenset(json.loads(row.tsus)),
    )


def described(subscriber: Subscriber) -> dict[str, Any]:
    """What an event or a listing may say about ``subscriber``: how it is identified and limited, no secret and no
    hash of one (the certificates' fingerprints are not secret)."""
    return {
        "name": subscriber.name,
        "enabled": subscriber.enabled,
        "networks": [str(n) for n in subscriber.networks],
        "token": subscriber.token_sha256 is not None,
        "basic_user": subscriber.basic_user,
        "certificates": [f.hex() for f in subscriber.cert_sha256],
        "quotas": [str(q) for q in subscriber.quotas],
        "rate_per_s": subscriber.rate_per_s,
        "tsus": None if subscriber.tsus is None else sorted(subscriber.tsus),
    }


class SubscriberStore:
    """Add, read, enable and disable subscribers; :meth:`load_directory` gives the server its snapshot."""

    def __init__(self, url: str, *, create: bool = False) -> None:
        self._url = url
        try:
            self._engine = open_engine(url, create=create, pooled=False)
        except (SQLAlchemyError, ImportError, OSError) as e:
            raise RecordingError(f"cannot open the records at {self._shown_url}: {e}") from e
        serialise_sqlite_writers(self._engine)
        self._events = ChainHead(new_chain_id())
        self._pending_head: tuple[int, bytes] | None = None

    @property
    def _shown_url(self) -> str:
        return mask_url(self._url)

    def add(self, subscriber: Subscriber) -> None:
        """Add ``subscriber``; ValueError if the name is taken or an identifier (network, token, basic user,
        certificate) is another subscriber's, and then nothing is written."""
        with self._transaction(f"add subscriber {subscriber.name}") as conn:
            if self._engine.dialect.name == "postgresql":
                # Concurrent adds check the others' identifiers one at a time (SQLite: BEGIN IMMEDIATE does this).
                conn.exec_driver_sql("LOCK TABLE subscribers IN SHARE ROW EXCLUSIVE MODE")
            existing = self._all(conn)
            if any(s.name == subscriber.name for s in existing):
                raise ValueError(f"subscriber {subscriber.name} already exists")
            SubscriberDirectory([*existing, subscriber])  # refuses an identifier claimed twice
            conn.execute(insert(subscribers), [_to_row(subscriber, _now_us())])
            self._event(conn, "subscriber.added", described(subscriber))

    def set_enabled(self, name: str, enabled: bool) -> bool:
        """Enable or disable ``name``; False when it already was (nothing recorded). KeyError for an unknown name."""
        with self._transaction(f"{'enable' if enabled else 'disable'} subscriber {name}") as conn:
            current = conn.execute(select(subscribers.c.enabled).where(subscribers.c.name == name)).first()
            if current is None:
                raise KeyError(name)
            if bool(current.enabled) == enabled:
                return False
            conn.execute(update(subscribers).where(subscribers.c.name == name).values(enabled=enabled))
            self._event(conn, f"subscriber.{'enabled' if enabled else 'disabled'}", {"name": name})
        return True

    def get(self, name: str) -> Subscriber | None:
        with self._reading() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.name == name)).first()
        return None if row is None else _from_row(row)

    def list(self) -> tuple[Subscriber, ...]:
        """Every subscriber, by name."""
        with self._reading() as conn:
            return self._all(conn)

    def load_directory(self) -> SubscriberDirectory:
        """A snapshot of every subscriber for the server (at start-up and on reload)."""
        return SubscriberDirectory(self.list())

    def close(self) -> None:
        self._engine.dispose()

    # --- internals ---

    @staticmethod
    def _all(conn: Connection) -> tuple[Subscriber, ...]:
        return tuple(_from_row(r) for r in conn.execute(select(subscribers).order_by(subscribers.c.name)))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as e:
            raise RecordingError(f"cannot read the subscribers from {self._shown_url}: {e}") from e

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        """One write transaction; the event chain's head advances only once it has committed."""
        self._pending_head = None
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError as e:
            raise ValueError(f"cannot {what}: a name or identifier is already another subscriber's") from e
        except SQLAlchemyError as e:
            raise RecordingError(f"cannot {what}: {e}") from e
        if self._pending_head is not None:
            self._events.advance(*self._pending_head)

    def _event(self, conn: Connection, kind: str, detail: Mapping[str, Any]) -> None:
        head = self._events
        row = {"at_us": _now_us(), "kind": kind, "tsu": None, "detail": json.dumps(dict(detail))}
        seq = head.seq + 1
        entry = event_entry_hash(head.entry_hash, head.chain, seq, row)
        row.update(chain=head.chain, seq=seq, prev_hash=head.entry_hash, entry_hash=entry)
        conn.execute(insert(events), [row])
        self._pending_head = (seq, entry)


def _now_us() -> int:
    return time.time_ns() // 1000
