"""The one exception hierarchy of stampd, and the one table of what each failure answers.

Every refusal of a well-formed request is a :class:`Rejection` whose class names exactly one PKIFailureInfo bit
(RFC 3161 §2.4.2); every refusal at the HTTP level is a :class:`TransportError` whose class names exactly one HTTP
status. Nothing else decides what a client is told.
"""

from __future__ import annotations

from enum import IntEnum


class FailureInfo(IntEnum):
    """PKIFailureInfo bits a TSA may set (RFC 3161 §2.4.2, SPEC STS-03)."""

    BAD_ALG = 0
    BAD_REQUEST = 2
    BAD_DATA_FORMAT = 5
    TIME_NOT_AVAILABLE = 14
    UNACCEPTED_POLICY = 15
    UNACCEPTED_EXTENSION = 16
    ADD_INFO_NOT_AVAILABLE = 17
    SYSTEM_FAILURE = 25


class StampdError(Exception):
    """Root of every error stampd raises on purpose; its message is fit to show to a user."""


class ConfigError(StampdError):
    """A configuration file or value is wrong; the message names the file and the field."""


class PKIError(StampdError):
    """A key, certificate or chain cannot be used as configured (refused at start-up, SPEC CRT-07)."""


class ParseError(StampdError):
    """Bytes that are not a well-formed structure of the expected type (a request body answers HTTP 400)."""

    http_status = 400


# --- Rejections: a well-formed request that cannot be granted gets a DER rejection with one failure bit ---


class Rejection(StampdError):
    """A request that is understood but not granted (RFC 3161 status rejection)."""

    fail_info: FailureInfo = FailureInfo.BAD_REQUEST


class BadAlgorithm(Rejection):
    fail_info = FailureInfo.BAD_ALG


class BadDataFormat(Rejection):
    fail_info = FailureInfo.BAD_DATA_FORMAT


class UnacceptedPolicy(Rejection):
    fail_info = FailureInfo.UNACCEPTED_POLICY


class UnacceptedExtension(Rejection):
    fail_info = FailureInfo.UNACCEPTED_EXTENSION


class TimeNotAvailable(Rejection):
    fail_info = FailureInfo.TIME_NOT_AVAILABLE


class SystemFailure(Rejection):
    fail_info = FailureInfo.SYSTEM_FAILURE


class SigningError(SystemFailure):
    """The signer could not produce a signature (key file, HSM or certificate problem)."""


class RecordingError(SystemFailure):
    """The token could not be recorded durably, so it must not be returned."""


# --- Transport errors: refusals before there is a request to reject, each one HTTP status ---


class TransportError(StampdError):
    http_status: int = 400


class MalformedRequest(TransportError):
    http_status = 400


class RequestTimeout(TransportError):
    http_status = 408


class LengthRequired(TransportError):
    http_status = 411


class PayloadTooLarge(TransportError):
    http_status = 413


class UnsupportedMediaType(TransportError):
    http_status = 415


class NotFound(TransportError):
    http_status = 404


class MethodNotAllowed(TransportError):
    http_status = 405

    def __init__(self, message: str, *, allow: bytes) -> None:
        super().__init__(message)
        self.allow = allow


class Unauthorized(TransportError):
    """No subscriber could be identified (or the credentials presented are wrong) on a subscribers-only TSU."""

    http_status = 401


class Forbidden(TransportError):
    """The caller is a known subscriber, but disabled or not one this TSU serves."""

    http_status = 403


class TooManyRequests(TransportError):
    """The subscriber's quota or request rate is spent; ``retry_after_s`` says when to come back."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int, limit: str = "quota") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit
        """``quota`` or ``rate``: which kind of limit is spent (the refusals metric's reason)."""


# --- Relying party ---


class VerificationError(StampdError):
    """A token could not be checked at all (not a token, unreadable certificates)."""
