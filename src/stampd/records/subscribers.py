"""The subscribers in the records database (`stampd subscribers ...`; issue 6).

Every change is written together with its event (``subscriber.added``, ``subscriber.updated``,
``subscriber.disabled``, ``subscriber.enabled``) in one transaction, the event chained like every other
(stampd.records.chain) under a chain of this store's own, so `stampd audit verify` checks the history of the
subscribers too. No secret enters
the store: an API token only as its SHA-256, a basic password only as its scrypt hash; and no hash enters an event.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
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
        **_identifiers_and_limits(subscriber),
        "created_at_us": created_at_us,
    }


def _identifiers_and_limits(subscriber: Subscriber) -> dict[str, Any]:
    """The columns :meth:`SubscriberStore.update` may change."""
    return {
        "networks": json.dumps([str(n) for n in subscriber.networks]),
        "token_sha256": subscriber.token_sha256,
        "basic_user": subscriber.basic_user,
        "basic_hash": subscriber.basic_hash,
        "cert_sha256": json.dumps([f.hex() for f in subscriber.cert_sha256]),
        "quotas": json.dumps([str(q) for q in subscriber.quotas]),
        "rate_per_s": subscriber.rate_per_s,
        "tsus": None if subscriber.tsus is None else json.dumps(sorted(subscriber.tsus)),
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


UPDATABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "networks": (("networks",), "networks"),
    "token": (("token_sha256",), "token"),
    "basic": (("basic_user", "basic_hash"), "basic_user"),
    "certificates": (("cert_sha256",), "certificates"),
    "quotas": (("quotas",), "quotas"),
    "rate_per_s": (("rate_per_s",), "rate_per_s"),
    "tsus": (("tsus",), "tsus"),
}
"""What :meth:`SubscriberStore.update` may change, by the name its event gives it: the `Subscriber` attributes it
covers, and the key of :func:`described` that the event shows for it (never a secret or a hash: a new token shows
as ``"token": true``, new basic credentials as the user name)."""


def changed_fields(before: Subscriber, after: Subscriber) -> tuple[str, ...]:
    """The :data:`UPDATABLE` names whose attributes differ (lists compared as sets: their order means nothing)."""

    def value(subscriber: Subscriber, attribute: str) -> Any:
        found = getattr(subscriber, attribute)
        return frozenset(found) if isinstance(found, tuple) else found

    return tuple(
        name
        for name, (attributes, _) in UPDATABLE.items()
        if any(value(before, a) != value(after, a) for a in attributes)
    )


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

    def update(self, name: str, change: Callable[[Subscriber], Subscriber]) -> tuple[str, ...]:
        """Replace subscriber ``name`` with ``change(current)``, read and written in one transaction (no concurrent
        update is lost), with a ``subscriber.updated`` event naming what changed: the names of :data:`UPDATABLE`,
        empty when nothing did (and then nothing is recorded). KeyError for an unknown name; ValueError (nothing
        written) if ``change`` raises it, renames or enables/disables, leaves no identifier, or claims an identifier
        of another subscriber."""
        with self._transaction(f"update subscriber {name}") as conn:
            if self._engine.dialect.name == "postgresql":
                conn.exec_driver_sql("LOCK TABLE subscribers IN SHARE ROW EXCLUSIVE MODE")
            existing = self._all(conn)
            current = next((s for s in existing if s.name == name), None)
            if current is None:
                raise KeyError(name)
            updated = change(current)
            if (updated.name, updated.enabled) != (current.name, current.enabled):
                raise ValueError("an update changes neither the name nor the enabled state")
            if not (updated.networks or updated.token_sha256 or updated.basic_user or updated.cert_sha256):
                raise ValueError(
                    f"subscriber {name} would have no identifier left: keep or give a network, a token, "
                    "basic credentials or a certificate"
                )
            changed = changed_fields(current, updated)
            if not changed:
                return ()
            # Refuses an identifier claimed twice, naming the other subscriber (the one checked last is refused).
            SubscriberDirectory([*(s for s in existing if s.name != name), updated])
            values = _identifiers_and_limits(updated)
            conn.execute(update(subscribers).where(subscribers.c.name == name).values(**values))
            now = described(updated)
            self._event(
                conn,
                "subscriber.updated",
                {"name": name, "changed": list(changed), **{UPDATABLE[f][1]: now[UPDATABLE[f][1]] for f in changed}},
            )
        return changed

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
