"""The verdict of a verification: one named result per step, and what the token says (RFC 3161 §2.4.2).

Modelled on pyHanko's status objects: verification returns a report instead of raising for "valid but untrusted",
so a caller sees every step, not only the first failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class Check:
    """Names of the verification steps, in the order they run."""

    STATUS = "status"
    STRUCTURE = "structure"
    SIGNER = "signer"
    CONTENT_TYPE = "content-type"
    MESSAGE_DIGEST = "message-digest"
    SIGNATURE = "signature"
    SIGNING_CERTIFICATE = "signing-certificate"
    CHAIN = "chain"
    TSU_PROFILE = "tsu-profile"
    TSA_NAME = "tsa-name"
    IMPRINT = "imprint"
    POLICY = "policy"
    NONCE = "nonce"


ALL_CHECKS: tuple[str, ...] = tuple(v for k, v in vars(Check).items() if k.isupper())
"""Every step, in the order they run (the order of :class:`Check`)."""

REQUIRED_CHECKS: tuple[str, ...] = (
    Check.STRUCTURE,
    Check.SIGNER,
    Check.CONTENT_TYPE,
    Check.MESSAGE_DIGEST,
    Check.SIGNATURE,
    Check.SIGNING_CERTIFICATE,
    Check.CHAIN,
    Check.TSU_PROFILE,
    Check.IMPRINT,
)
"""Steps that must pass, not merely not fail, for a token to be accepted; the others may be skipped."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    outcome: Outcome
    detail: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """Every step's result and the token's identity; ``ok`` only when nothing failed and every required step passed."""

    checks: tuple[CheckResult, ...]
    tsu: str | None
    """Subject of the signer certificate found by its SignerIdentifier (never by position)."""
    serial: int | None
    gen_time: datetime | None
    policy: str | None
    nonce: int | None

    @property
    def ok(self) -> bool:
        if any(c.outcome is Outcome.FAILED for c in self.checks):
            return False
        passed = {c.name for c in self.checks if c.outcome is Outcome.OK}
        return all(name in passed for name in REQUIRED_CHECKS)

    def check(self, name: str) -> CheckResult:
        """The result of step ``name`` (one of :class:`Check`)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.outcome is Outcome.FAILED)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form; integers that may exceed 2**53 are decimal strings."""
        return {
            "ok": self.ok,
            "tsu": self.tsu,
            "serial": None if self.serial is None else str(self.serial),
            "gen_time": None if self.gen_time is None else self.gen_time.isoformat(),
            "policy": self.policy,
            "nonce": None if self.nonce is None else str(self.nonce),
            "checks": [
                {"name": c.name, "outcome": str(c.outcome), "detail": c.detail, "warnings": list(c.warnings)}
                for c in self.checks
            ],
        }
