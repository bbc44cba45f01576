"""Which requests a TSU grants, decided from the request's values alone (RFC 3161 §2.4.1-2.4.2)."""

from __future__ import annotations

from dataclasses import dataclass

from stampd.errors import BadAlgorithm, BadDataFormat, UnacceptedExtension, UnacceptedPolicy
from stampd.model import TimeStampRequest
from stampd.oids import HASH_BY_NAME, HASH_BY_OID


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """A TSU's rules: the policy it applies by default, the others it accepts, and the imprint hashes it takes."""

    default_policy: str
    accepted_policies: frozenset[str]
    hash_algorithms: frozenset[str]
    """Names from :data:`stampd.oids.HASH_BY_NAME`."""

    def __post_init__(self) -> None:
        unknown = self.hash_algorithms - HASH_BY_NAME.keys()
        if unknown:
            raise ValueError(f"unknown hash algorithms: {sorted(unknown)}")

    def policy_for(self, request: TimeStampRequest) -> str:
        """The policy the token will carry, or the rejection that the request earns (SPEC REQ-01..03, REQ-06, REQ-11).

        REQ-04: the imprint is never examined beyond its length.
        """
        if request.version != 1:
            raise BadDataFormat(f"unsupported request version {request.version}")
        if request.extension_oids:
            raise UnacceptedExtension("request extensions are not supported")
        algorithm = HASH_BY_OID.get(request.imprint.hash_oid)
        if algorithm is None or algorithm.name not in self.hash_algorithms:
            raise BadAlgorithm(f"hash algorithm {request.imprint.hash_oid} is not accepted")
        if len(request.imprint.digest) != algorithm.digest_size:
            raise BadDataFormat(
                f"a {algorithm.name} digest has {algorithm.digest_size} octets, not {len(request.imprint.digest)}"
            )
        if request.policy is None:
            return self.default_policy
        if request.policy == self.default_policy or request.policy in self.accepted_policies:
            return request.policy
        raise UnacceptedPolicy(f"policy {request.policy} is not accepted")
