"""The core with injected ports: a token leaves only once recorded; failures become one rejection bit.

SPEC STS-01, STS-02, STS-06, TST-04, OPS-09, REQ-08, REQ-14.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stampd.der.token import GenTimeFormatter
from stampd.der.token_reader import read_response
from stampd.errors import FailureInfo, RecordingError, SigningError, TimeNotAvailable
from stampd.issuance import SigningKey, TimeStampingUnit
from stampd.model import Reply, TokenRecord
from stampd.policy import IssuancePolicy
from stampd.records.chain import GENESIS, token_entry_hash
from stampd.records.store import _row

VECTORS = Path(__file__).parents[1] / "vectors" / "stampd"
sys.path.insert(0, str(VECTORS))

from golden import GOLDEN_NS, GOLDEN_POLICY, SHA256_REQUEST, golden_template  # noqa: E402


class FixedClock:
    def __init__(self, ns: int | None) -> None:
        self.ns = ns

    def now_ns(self) -> int:
        if self.ns is None:
            raise TimeNotAvailable("time is not available")
        return self.ns


class CountingSerials:
    def __init__(self) -> None:
        self.next = 0

    def next_serial(self) -> int:
        self.next += 1
        return self.next


class MemoryRecords:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[TokenRecord] = []
        self.fail = fail

    async def record(self, record: TokenRecord) -> None:
        if self.fail:
            raise RecordingError("disk full")
        self.records.append(record)


ALWAYS = (0, 2**63)


def unit(
    clock: FixedClock, records: MemoryRecords, sign_fails: bool = False, window: tuple[int, int] = ALWAYS
) -> TimeStampingUnit:
    template = golden_template(VECTORS / "pki")
    if sign_fails:

        def broken(_: bytes) -> bytes:
            raise SigningError("HSM unplugged")

        template._sign = broken
    return TimeStampingUnit(
        name="golden",
        policy=IssuancePolicy(GOLDEN_POLICY, frozenset(), frozenset({"sha256"})),
        key=SigningKey(template, window[0], window[1], 1),
        gen_time=GenTimeFormatter(3),
        clock=clock,
        serials=CountingSerials(),
        records=records,
    )


def status_of(reply: Reply) -> tuple[int, tuple[int, ...]]:
    """The reply's PKIStatus and failInfo bits, as a client reads them; the Reply's own fail_info must agree."""
    status = read_response(reply.body).status
    assert reply.fail_info == (status.fail_bits[0] if status.fail_bits else None)
    assert reply.granted == (status.status == 0)
    return status.status, status.fail_bits


def test_granted_token_is_recorded_before_it_is_returned() -> None:
    records = MemoryRecords()
    reply = asyncio.run(unit(FixedClock(GOLDEN_NS + 456_789), records).respond(SHA256_REQUEST, "192.0.2.7"))
    assert status_of(reply) == (0, ())
    der = reply.body
    (record,) = records.records
    assert record.token == der
    assert record.serial == 1 and record.tsu == "golden" and record.policy == GOLDEN_POLICY
    assert record.gen_time == "20260301120000.123Z" and record.gen_time_ns == GOLDEN_NS
    assert record.nonce == SHA256_REQUEST.nonce and record.imprint == SHA256_REQUEST.imprint.digest
    assert record.requester == "192.0.2.7" and record.subscriber is None
    assert b"192.0.2.7" not in der and bytes([192, 0, 2, 7]) not in der  # REQ-14


def test_serials_differ_per_token_tst_04() -> None:
    records = MemoryRecords()
    tsu = unit(FixedClock(GOLDEN_NS), records)
    for _ in range(3):
        asyncio.run(tsu.respond(SHA256_REQUEST, None))
    assert [r.serial for r in records.records] == [1, 2, 3]


def test_recording_failure_returns_system_failure_and_no_token() -> None:
    der = asyncio.run(unit(FixedClock(GOLDEN_NS), MemoryRecords(fail=True)).respond(SHA256_REQUEST, None))
    assert status_of(der) == (2, (FailureInfo.SYSTEM_FAILURE,))
    assert len(der.body) < 200


def test_signing_failure_is_system_failure_sts_06() -> None:
    records = MemoryRecords()
    der = asyncio.run(unit(FixedClock(GOLDEN_NS), records, sign_fails=True).respond(SHA256_REQUEST, None))
    assert status_of(der) == (2, (FailureInfo.SYSTEM_FAILURE,))
    assert records.records == []


def test_untrusted_clock_is_time_not_available_sts_06() -> None:
    records = MemoryRecords()
    der = asyncio.run(unit(FixedClock(None), records).respond(SHA256_REQUEST, None))
    assert status_of(der) == (2, (FailureInfo.TIME_NOT_AVAILABLE,))
    assert records.records == []


def test_policy_rejection_carries_its_reason() -> None:
    der = asyncio.run(
        unit(FixedClock(GOLDEN_NS), MemoryRecords()).respond(replace(SHA256_REQUEST, policy="1.2.3"), None)
    )
    status = read_response(der.body).status
    assert der.fail_info == FailureInfo.UNACCEPTED_POLICY
    assert status.fail_bits == (FailureInfo.UNACCEPTED_POLICY,)
    assert status.status_strings == ("policy 1.2.3 is not accepted",)


@pytest.mark.parametrize("nonce", [None, 0, 1, 2**255, 2**256 - 1, -5])
def test_nonce_echoed_by_value_req_07_req_08(nonce: int | None) -> None:
    der = asyncio.run(unit(FixedClock(GOLDEN_NS), MemoryRecords()).respond(replace(SHA256_REQUEST, nonce=nonce), None))
    token = read_response(der.body).token
    assert token is not None and token.tst_info.nonce == nonce


@pytest.mark.parametrize("offset_ns", [-1_000_000, 1_000_000])
def test_no_token_outside_the_signing_window_crt_06_ops_05(offset_ns: int) -> None:
    """A genTime before the certificate's (or key usage period's) start or after its end gets systemFailure."""
    records = MemoryRecords()
    window = (GOLDEN_NS, GOLDEN_NS) if offset_ns < 0 else (0, GOLDEN_NS)
    clock = FixedClock(GOLDEN_NS + offset_ns)
    der = asyncio.run(unit(clock, records, window=window).respond(SHA256_REQUEST, None))
    assert status_of(der) == (2, (FailureInfo.SYSTEM_FAILURE,))
    assert records.records == []
    granted = asyncio.run(unit(FixedClock(GOLDEN_NS), records, window=window).respond(SHA256_REQUEST, None))
    assert status_of(granted) == (0, ())


def test_rollover_switches_at_the_instant_with_no_gap_and_no_overlap() -> None:
    """Tokens dated before the activation instant carry the old key's signature, from it on the new key's; the
    switch is reported once. The two keys here differ by their templates' certificates (ESSCertIDv2)."""
    old_template = golden_template(VECTORS / "pki")
    new_template = golden_template(VECTORS / "pki")
    new_template._sign = lambda data: b"new-key-signature"  # stands in for the successor key
    activated: list[tuple[str, int]] = []
    clock = FixedClock(GOLDEN_NS - 3_000_000)
    records = MemoryRecords()
    tsu = TimeStampingUnit(
        name="golden",
        policy=IssuancePolicy(GOLDEN_POLICY, frozenset(), frozenset({"sha256"})),
        key=SigningKey(old_template, 0, GOLDEN_NS + 10**9, 1),
        gen_time=GenTimeFormatter(3),
        clock=clock,
        serials=CountingSerials(),
        records=records,
        successor=(GOLDEN_NS, SigningKey(new_template, GOLDEN_NS, 2**63, 2)),
        on_activate=lambda name, key: activated.append((name, key.certificate_serial)),
    )
    assert tsu.key_at(GOLDEN_NS + 10**9).certificate_serial == 2  # an observer asking about later instants...
    signatures = []
    for offset_ms in (-3, -2, -1, 0, 1, 2):  # ...switches nothing: the genTime alone picks the key
        clock.ns = GOLDEN_NS + offset_ms * 1_000_000
        der = asyncio.run(tsu.respond(SHA256_REQUEST, None)).body
        token = read_response(der).token
        assert token is not None
        signatures.append(token.signer_infos[0].signature)
    assert [s == b"new-key-signature" for s in signatures] == [False, False, False, True, True, True]
    assert activated == [("golden", 2)]
    clock.ns = GOLDEN_NS - 1_000_000  # a step back after the switch never returns to the old key
    assert tsu.key_at(clock.ns).certificate_serial == 2


def test_the_subscriber_is_recorded_and_chained_only_when_set() -> None:
    """A subscriber's token names it in its record, and the record's chain entry covers it; a token without one
    hashes exactly as before subscribers existed, so existing chains and golden hashes stay valid."""
    records = MemoryRecords()
    reply = asyncio.run(unit(FixedClock(GOLDEN_NS), records).respond(SHA256_REQUEST, "192.0.2.7", "acme"))
    assert status_of(reply) == (0, ())
    (record,) = records.records
    assert record.subscriber == "acme" and b"acme" not in reply.body  # REQ-14: the token never names it
    row = _row(record)
    before = token_entry_hash(GENESIS, "c", 1, {k: v for k, v in row.items() if k != "subscriber"})
    assert token_entry_hash(GENESIS, "c", 1, {**row, "subscriber": None}) == before
    assert token_entry_hash(GENESIS, "c", 1, row) != before
    assert token_entry_hash(GENESIS, "c", 1, {**row, "subscriber": ""}) != before  # absent is not empty
