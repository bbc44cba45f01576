"""The relying party: verification of RFC 3161 time-stamp tokens against trust anchors.

Installable without the server: imports only :mod:`stampd.der`, :mod:`stampd.certprofile` and cryptography.
"""

from stampd.verify.chain import ChainResult, validate_chain
from stampd.verify.report import Check, CheckResult, Outcome, VerificationReport
from stampd.verify.token import verify_timestamp

__all__ = [
    "ChainResult",
    "Check",
    "CheckResult",
    "Outcome",
    "VerificationReport",
    "validate_chain",
    "verify_timestamp",
]
