"""Immutable values that cross the core's boundary: the request, the issued token and its record."""

from __future__ import annotations

from dataclasses import dataclass

from stampd.errors import FailureInfo


@dataclass(frozen=True, slots=True)
class MessageImprint:
    """The hash the requester wants stamped (RFC 3161 §2.4.1).

    ``params_null`` keeps whether the AlgorithmIdentifier carried a NULL parameter, so that the token repeats the
    identifier exactly as it was sent (SPEC TST-03, REQ-05).
    """

    hash_oid: str
    params_null: bool
    digest: bytes


@dataclass(frozen=True, slots=True)
class TimeStampRequest:
    """A decoded TimeStampReq; values, not bytes (SPEC REQ-13)."""

    version: int
    imprint: MessageImprint
    policy: str | None
    nonce: int | None
    cert_req: bool
    extension_oids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the records keep of every issued token (SPEC OPS-09); the requester never enters the token.

    ``subscriber`` names the subscriber that was granted the token on a subscribers-only TSU (billing counts it).
    """

    serial: int
    gen_time_ns: int
    gen_time: str
    tsu: str
    policy: str
    hash_oid: str
    imprint: bytes
    nonce: int | None
    token: bytes
    requester: str | None
    subscriber: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token not yet released: it leaves only once its record is durable."""

    record: TokenRecord
    response: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """A TSU's answer to one request: the DER TimeStampResp, and the failInfo bit when it is a rejection (None for
    a granted token), so that the server can count and release without decoding its own DER."""

    body: bytes
    fail_info: FailureInfo | None = None

    @property
    def granted(self) -> bool:
        return self.fail_info is None
