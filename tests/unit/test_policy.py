"""IssuancePolicy: which requests are granted, and which single failure bit the others get (SPEC REQ-01..06, REQ-11)."""

from __future__ import annotations

import dataclasses

import pytest

from stampd.errors import BadAlgorithm, BadDataFormat, UnacceptedExtension, UnacceptedPolicy
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA1, SHA256, SHA512
from stampd.policy import IssuancePolicy

POLICY = "2.25.1"
OTHER = "2.25.2"

RULES = IssuancePolicy(POLICY, frozenset({OTHER}), frozenset({"sha256", "sha512"}))
REQUEST = TimeStampRequest(1, MessageImprint(SHA256.oid, True, bytes(32)), None, None, False, ())


def with_(**changes: object) -> TimeStampRequest:
    return dataclasses.replace(REQUEST, **changes)  # type: ignore[arg-type]


def test_default_policy_when_none_requested_tst_02() -> None:
    assert RULES.policy_for(REQUEST) == POLICY


def test_all_zero_digest_is_granted_req_04() -> None:
    assert RULES.policy_for(with_(imprint=MessageImprint(SHA256.oid, False, bytes(32)))) == POLICY


@pytest.mark.parametrize("requested", [POLICY, OTHER])
def test_accepted_policy_is_applied_req_06(requested: str) -> None:
    assert RULES.policy_for(with_(policy=requested)) == requested


def test_unaccepted_policy_req_06() -> None:
    with pytest.raises(UnacceptedPolicy):
        RULES.policy_for(with_(policy="1.2.3.4.5"))


@pytest.mark.parametrize("hash_oid", ["1.2.840.113549.2.5", "1.2.3.4", SHA1.oid])
def test_unknown_weak_or_disabled_hash_is_bad_alg_req_03(hash_oid: str) -> None:
    with pytest.raises(BadAlgorithm):
        RULES.policy_for(with_(imprint=MessageImprint(hash_oid, True, bytes(20))))


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_wrong_digest_length_is_bad_data_format_req_02(size: int) -> None:
    with pytest.raises(BadDataFormat, match="32 octets"):
        RULES.policy_for(with_(imprint=MessageImprint(SHA256.oid, True, bytes(size))))


def test_sha512_length_checked_too_req_02() -> None:
    assert RULES.policy_for(with_(imprint=MessageImprint(SHA512.oid, True, bytes(64)))) == POLICY
    with pytest.raises(BadDataFormat):
        RULES.policy_for(with_(imprint=MessageImprint(SHA512.oid, True, bytes(32))))


def test_version_other_than_1_req_01() -> None:
    with pytest.raises(BadDataFormat, match="version 2"):
        RULES.policy_for(with_(version=2))


def test_any_extension_is_unaccepted_req_11() -> None:
    with pytest.raises(UnacceptedExtension):
        RULES.policy_for(with_(extension_oids=("1.2.3.4",)))


def test_unknown_hash_name_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="md5"):
        IssuancePolicy(POLICY, frozenset(), frozenset({"md5"}))
