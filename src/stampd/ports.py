"""What the core needs from the outside world, as Protocols; adapters implement them."""

from __future__ import annotations

from typing import Protocol

from stampd.model import TokenRecord


class Clock(Protocol):
    """The time source that genTime comes from."""

    def now_ns(self) -> int:
        """Nanoseconds since the Unix epoch, UTC; raises :class:`stampd.errors.TimeNotAvailable` when untrusted."""
        ...


class Signer(Protocol):
    """A private key that signs the DER of the signed attributes (RFC 5652 §5.4).

    ``digest_algorithm`` is the hash the signature and the message-digest attribute use;
    ``signature_algorithm`` is the DER AlgorithmIdentifier that goes into SignerInfo.signatureAlgorithm.
    """

    @property
    def digest_algorithm(self) -> str: ...

    @property
    def signature_algorithm(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; raises :class:`stampd.errors.SigningError` when the key cannot be used."""
        ...


class SerialSource(Protocol):
    def next_serial(self) -> int:
        """A positive integer below 2**160 that this TSA has never used (SPEC TST-04, TST-05)."""
        ...


class RecordSink(Protocol):
    async def record(self, record: TokenRecord) -> None:
        """Return only once ``record`` is durable; raises :class:`stampd.errors.RecordingError` otherwise."""
        ...
