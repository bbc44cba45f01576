"""Property tests for the request path: the TimeStampReq decoder, the issuance policy and the ASGI application.

SPEC REQ-12 (undecodable input → badDataFormat or HTTP 4xx, never a token or a 5xx), REQ-13 (values, not bytes),
GUIDE habit 9 (random or mutated bytes raise only ParseError; round trips).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from asn1crypto import cms, core, tsp
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from stampd.app import create_app
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.der.encoding import oid, sequence, tlv
from stampd.der.request import MAX_NONCE_BITS, decode_request, decode_request_asn1crypto, encode_request
from stampd.errors import (
    BadAlgorithm,
    BadDataFormat,
    ParseError,
    Rejection,
    UnacceptedExtension,
    UnacceptedPolicy,
)
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import HASH_ALGORITHMS, HASH_BY_OID
from stampd.policy import IssuancePolicy

DECLARED_REJECTIONS = (BadAlgorithm, BadDataFormat, UnacceptedPolicy, UnacceptedExtension)
"""What IssuancePolicy.policy_for may raise (stampd/policy.py imports exactly these)."""

DEFAULT_POLICY = "1.3.6.1.4.1.99999.1"
OTHER_POLICY = "1.3.6.1.4.1.99999.2"

# --- strategies ---

oids = st.builds(
    lambda first, second, rest: ".".join(map(str, [first, second, *rest])),
    st.integers(0, 2),
    st.integers(0, 39),
    st.lists(st.integers(0, 2**64), max_size=6),
)
"""Dotted OIDs that X.660 allows (second arc <= 39 under 0 and 1, which the generator also keeps under 2)."""

hash_oids = st.one_of(
    st.sampled_from([h.oid for h in HASH_ALGORITHMS]), st.sampled_from([h.oid for h in HASH_ALGORITHMS]), oids
)


@st.composite
def imprints(draw: st.DrawFn) -> MessageImprint:
    """Known hashes with the right digest length most of the time; otherwise any OID and any length."""
    oid = draw(hash_oids)
    known = HASH_BY_OID.get(oid)
    size = known.digest_size if known and draw(st.integers(0, 3)) else draw(st.integers(0, 80))
    digest = draw(st.binary(min_size=size, max_size=size))
    return MessageImprint(hash_oid=oid, params_null=draw(st.booleans()), digest=digest)


nonces = st.one_of(
    st.none(),
    st.integers(-(2**MAX_NONCE_BITS) + 1, 2**MAX_NONCE_BITS - 1),
    st.sampled_from([0, 1, 0x80, 0xFF, 2**63, 2**255, 2**256 - 1, -1, -128, -129]),
)

requests = st.builds(
    TimeStampRequest,
    # versions are bounded to 4 octets by the reader (stampd.der.request.MAX_VERSION_OCTETS); wider is ParseError
    version=st.one_of(st.just(1), st.just(1), st.just(1), st.integers(-(2**31), 2**31 - 1)),
    imprint=imprints(),
    policy=st.one_of(st.none(), st.just(DEFAULT_POLICY), st.just(OTHER_POLICY), oids),
    nonce=nonces,
    cert_req=st.booleans(),
    extension_oids=st.just(()),
)
"""Every request `encode_request` can express (it does not encode extensions)."""

grantable_requests = st.builds(
    TimeStampRequest,
    version=st.just(1),
    imprint=st.sampled_from([h for h in HASH_ALGORITHMS if h.name in ("sha256", "sha384", "sha512")]).flatmap(
        lambda h: st.builds(
            MessageImprint, st.just(h.oid), st.booleans(), st.binary(min_size=h.digest_size, max_size=h.digest_size)
        )
    ),
    policy=st.sampled_from([None, DEFAULT_POLICY]),
    nonce=nonces,
    cert_req=st.booleans(),
    extension_oids=st.just(()),
)
"""Requests a TSU with the default hash set grants when the policy is DEFAULT_POLICY or absent."""


def length_offsets(der: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets of every length octet (first one of each TLV) in a DER/BER blob of low-tag-number TLVs."""
    end = len(der) if end is None else end
    offsets = []
    i = start
    while i + 1 < end:
        tag, n = der[i], der[i + 1]
        offsets.append(i + 1)
        header = 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(der[i + 2 : i + 2 + k], "big")
            header += k
        if tag & 0x20:
            offsets += length_offsets(der, i + header, min(i + header + n, end))
        i += header + n
    return offsets


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(mutation, bytes): a valid encoded request with one corruption."""
    der = encode_request(draw(requests))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "length", "trailing", "replace", "delete"]))
    if kind == "flip":
        i = draw(st.integers(0, len(der) - 1))
        bit = draw(st.integers(0, 7))
        return kind, der[:i] + bytes((der[i] ^ (1 << bit),)) + der[i + 1 :]
    if kind == "truncate":
        return kind, der[: draw(st.integers(0, len(der) - 1))]
    if kind == "insert":
        i = draw(st.integers(0, len(der)))
        return kind, der[:i] + draw(st.binary(min_size=1, max_size=8)) + der[i:]
    if kind == "length":
        i = draw(st.sampled_from(length_offsets(der)))
        value = draw(st.one_of(st.integers(0, 255), st.sampled_from([0x80, 0x81, 0x84, 0xFF])))
        assume(value != der[i])
        return kind, der[:i] + bytes((value,)) + der[i + 1 :]
    if kind == "trailing":
        return kind, der + draw(st.binary(min_size=1, max_size=16))
    if kind == "replace":
        i = draw(st.integers(0, len(der) - 1))
        return kind, der[:i] + bytes((draw(st.integers(0, 255)),)) + der[i + 1 :]
    i = draw(st.integers(0, len(der) - 1))
    return kind, der[:i] + der[i + draw(st.integers(1, 4)) :]


def decode_or_parse_error(body: bytes) -> TimeStampRequest | None:
    """The decoder's contract: a well-typed TimeStampRequest, or ParseError (any other exception fails the test)."""
    try:
        request = decode_request(body)
    except ParseError:
        return None
    assert isinstance(request, TimeStampRequest)
    assert isinstance(request.version, int)
    assert isinstance(request.imprint.hash_oid, str)
    assert isinstance(request.imprint.params_null, bool)
    assert isinstance(request.imprint.digest, bytes)
    assert request.policy is None or isinstance(request.policy, str)
    assert request.nonce is None or (isinstance(request.nonce, int) and request.nonce.bit_length() <= MAX_NONCE_BITS)
    assert isinstance(request.cert_req, bool)
    assert all(isinstance(o, str) for o in request.extension_oids)
    return request


# --- decoder ---


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_parse_error_req12(body: bytes) -> None:
    """REQ-12: arbitrary bytes decode to a TimeStampRequest or raise ParseError, nothing else."""
    decode_or_parse_error(body)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_random_bytes_inside_a_sequence_raise_only_parse_error_req12(content: bytes) -> None:
    """REQ-12: random content behind a plausible SEQUENCE header reaches deeper into the decoder."""
    decode_or_parse_error(b"\x30" + bytes((len(content),)) + content)


@settings(max_examples=1000)
@given(mutated_requests())
def test_mutated_requests_raise_only_parse_error_req12(mutation: tuple[str, bytes]) -> None:
    """REQ-12: bit flips, truncation, insertion, deletion, length-octet corruption and trailing bytes never make the
    decoder raise anything but ParseError; a truncated request or one with trailing bytes is never accepted."""
    kind, body = mutation
    request = decode_or_parse_error(body)
    if kind in ("truncate", "trailing"):
        assert request is None, f"a {kind}d request was accepted"


@settings(max_examples=500)
@given(requests)
def test_encode_decode_round_trip(request: TimeStampRequest) -> None:
    """encode_request → decode_request gives back the same values; the encoding is DER (asn1crypto re-encodes it
    byte for byte)."""
    der = encode_request(request)
    assert decode_request(der) == request
    assert tsp.TimeStampReq.load(der).dump(force=True) == der


@settings(max_examples=300)
@given(requests, st.integers(1, 3))
def test_ber_long_form_lengths_decode_to_the_same_values_req13(request: TimeStampRequest, extra: int) -> None:
    """REQ-13: re-encoding the outer length in a non-minimal long form (BER) changes nothing in the values."""
    der = encode_request(request)
    n = der[1]
    header = 2 + (n & 0x7F if n & 0x80 else 0)
    size = len(der) - header
    ber = (
        b"\x30"
        + bytes((0x80 | (size.bit_length() // 8 + extra),))
        + size.to_bytes(size.bit_length() // 8 + extra, "big")
        + der[header:]
    )
    assert decode_request(ber) == request


# --- policy ---

policies = st.builds(
    IssuancePolicy,
    default_policy=st.just(DEFAULT_POLICY),
    accepted_policies=st.sampled_from([frozenset(), frozenset({OTHER_POLICY})]),
    hash_algorithms=st.sets(st.sampled_from([h.name for h in HASH_ALGORITHMS]), min_size=1).map(frozenset),
)


def decoded_requests() -> st.SearchStrategy[TimeStampRequest]:
    """Requests as the server sees them: decoded from valid, mutated and extension-bearing encodings."""
    from_valid = st.one_of(requests, grantable_requests).map(encode_request)
    from_mutated = mutated_requests().map(lambda m: m[1])
    with_extensions = st.builds(
        lambda der, ext: der[:1] + _reframe(der, ext), requests.map(encode_request), _extension_blocks()
    )
    return st.one_of(from_valid, from_mutated, with_extensions).map(_decode_or_none).filter(lambda r: r is not None)  # type: ignore[return-value]


def _decode_or_none(body: bytes) -> TimeStampRequest | None:
    try:
        return decode_request(body)
    except ParseError:
        return None


def _reframe(der: bytes, tail: bytes) -> bytes:
    """Length + content of ``der``'s outer SEQUENCE with ``tail`` appended to its content."""
    n = der[1]
    header = 2 + (n & 0x7F if n & 0x80 else 0)
    content = der[header:] + tail
    size = len(content)
    length = (
        bytes((size,))
        if size < 0x80
        else bytes((0x80 | ((size.bit_length() + 7) // 8),)) + size.to_bytes((size.bit_length() + 7) // 8, "big")
    )
    return length + content


@st.composite
def _extension_blocks(draw: st.DrawFn) -> bytes:
    """`[0] Extensions` with 1-3 extensions, critical or not (REQ-11)."""
    items = b"".join(
        sequence(
            oid(draw(oids)), b"\x01\x01\xff" if draw(st.booleans()) else b"", tlv(0x04, draw(st.binary(max_size=8)))
        )
        for _ in range(draw(st.integers(1, 3)))
    )
    return tlv(0xA0, items)


@settings(max_examples=800, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(policies, decoded_requests())
def test_policy_raises_only_declared_rejections(policy: IssuancePolicy, request: TimeStampRequest) -> None:
    """REQ-01..03, REQ-06, REQ-11, STS-03: on any decoded request policy_for returns a policy or raises one of the
    declared Rejection subclasses; and when it grants, everything it promised to check holds."""
    try:
        granted = policy.policy_for(request)
    except DECLARED_REJECTIONS as e:
        assert type(e) in DECLARED_REJECTIONS
        event(type(e).__name__)
        return
    except Rejection as e:  # pragma: no cover - a failure message, not a branch
        pytest.fail(f"undeclared rejection {type(e).__name__}: {e}")
    event("granted")
    algorithm = HASH_BY_OID[request.imprint.hash_oid]
    assert request.version == 1
    assert not request.extension_oids
    assert algorithm.name in policy.hash_algorithms
    assert len(request.imprint.digest) == algorithm.digest_size
    assert granted == (request.policy or DEFAULT_POLICY)
    assert granted in {DEFAULT_POLICY, *policy.accepted_policies}


# --- the ASGI application, in process ---


class TimeStampResp(core.Sequence):
    """RFC 3161 §2.4.2 TimeStampResp (timeStampToken OPTIONAL, unlike asn1crypto's)."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


class InProcessTsa:
    """The real application of a fresh `stampd init` TSA, driven with ASGI messages on one event loop."""

    def __init__(self, directory: Path) -> None:
        result = CliRunner().invoke(cli, ["init", str(directory), "--key-type", "ec-p256"])
        assert result.exit_code == 0, result.output
        self.app = create_app(load_config(directory / "stampd.toml"))
        self.loop = asyncio.new_event_loop()
        self._lifespan_inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan_sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            self._lifespan_sent.append(message)

        self._lifespan = self.loop.create_task(self.app({"type": "lifespan"}, self._lifespan_inbox.get, send))
        self._lifespan_step("lifespan.startup")

    def _lifespan_step(self, kind: str) -> None:
        async def step() -> None:
            await self._lifespan_inbox.put({"type": kind})
            while not any(m["type"] == f"{kind}.complete" for m in self._lifespan_sent):
                assert not any(m["type"].endswith(".failed") for m in self._lifespan_sent), self._lifespan_sent
                await asyncio.sleep(0.001)

        self.loop.run_until_complete(step())

    def close(self) -> None:
        self._lifespan_step("lifespan.shutdown")
        self.loop.run_until_complete(self._lifespan)
        self.loop.close()

    def request(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 3180),
        }
        pending = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
        ] or [{"type": "http.request", "body": b"", "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        self.loop.run_until_complete(self.app(scope, receive, send))
        start, *bodies = sent
        assert start["type"] == "http.response.start"
        body = b"".join(m.get("body", b"") for m in bodies)
        return start["status"], dict(start["headers"]), body


@pytest.fixture(scope="module")
def in_process_tsa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessTsa]:
    tsa = InProcessTsa(tmp_path_factory.mktemp("asgi-tsa"))
    yield tsa
    tsa.close()


bodies = st.one_of(
    st.binary(max_size=300),
    requests.map(encode_request),
    mutated_requests().map(lambda m: m[1]),
    st.builds(lambda der, ext: der[:1] + _reframe(der, ext), requests.map(encode_request), _extension_blocks()),
)

content_types = st.sampled_from(
    [
        None,
        b"application/timestamp-query",
        b"Application/Timestamp-Query; charset=binary",
        b"text/plain",
        b"application/timestamp-reply",
        b"",
        b"\xff\xfe",
    ]
)

framings = st.sampled_from(["exact", "absent", "chunked", "huge", "garbage", "short", "long"])


well_formed = st.fixed_dictionaries(
    {
        "body": st.one_of(requests, grantable_requests).map(encode_request),
        "content_type": st.sampled_from([None, b"application/timestamp-query"]),
        "framing": st.sampled_from(["exact", "chunked"]),
        "method": st.just("POST"),
        "path": st.sampled_from(["/", "/default"]),
        "splits": st.lists(st.integers(0, 400), max_size=4),
    }
)
anything = st.fixed_dictionaries(
    {
        "body": bodies,
        "content_type": content_types,
        "framing": framings,
        "method": st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "HEAD"]),
        "path": st.sampled_from(["/", "/", "/", "/default", "/healthz", "/certs", "/nope", "//"]),
        "splits": st.lists(st.integers(0, 400), max_size=4),
    }
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=st.one_of(well_formed, anything))
def test_asgi_app_never_answers_500_req12_trn03(in_process_tsa: InProcessTsa, case: dict[str, Any]) -> None:
    """REQ-12, TRN-02, TRN-03, STS-01: whatever the body, headers, framing and chunking, the real application
    answers 200 or 4xx, never 5xx; a 200 to a POST on a TSU path is `application/timestamp-reply` with a DER
    TimeStampResp of status 0 (with a token) or 2 (with failInfo and without a token); an HTTP error never carries
    a time-stamp media type."""
    body, content_type, framing = case["body"], case["content_type"], case["framing"]
    method, path, splits = case["method"], case["path"], case["splits"]
    headers: list[tuple[bytes, bytes]] = []
    if content_type is not None:
        headers.append((b"content-type", content_type))
    declared = {"exact": len(body), "huge": 10**9, "short": max(0, len(body) - 1), "long": len(body) + 1}
    if framing in declared:
        headers.append((b"content-length", str(declared[framing]).encode()))
    elif framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
    elif framing == "garbage":
        headers.append((b"content-length", b"12x"))
    cuts = sorted({min(s, len(body)) for s in splits})
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]

    status, response_headers, data = in_process_tsa.request(method, path, headers, chunks)

    assert status == 200 or 400 <= status < 500, (status, data)
    event(f"HTTP {status}")
    assert response_headers[b"content-length"] == str(len(data)).encode()
    content = response_headers[b"content-type"]
    if status != 200:
        assert b"timestamp" not in content
        return
    if method == "POST" and path in ("/", "/default"):
        assert content == b"application/timestamp-reply"
        resp = TimeStampResp.load(data)
        assert resp.dump(force=True) == data  # CMS-11: DER throughout
        code = resp["status"]["status"].native
        event(f"HTTP 200 {code}")
        assert code in ("granted", "rejection")
        if code == "granted":
            assert resp["time_stamp_token"]["content_type"].native == "signed_data"
            assert isinstance(resp["status"]["fail_info"], core.Void)
        else:
            assert isinstance(resp["time_stamp_token"], core.Void)
            assert resp["status"]["fail_info"].native  # exactly one named failure
            assert len(resp["status"]["fail_info"].native) == 1


def _asn1crypto_or_none(body: bytes) -> TimeStampRequest | None:
    try:
        return decode_request_asn1crypto(body)
    except ParseError:
        return None


@settings(max_examples=1500)
@given(st.one_of(mutated_requests().map(lambda m: m[1]), requests.map(encode_request), st.binary(max_size=256)))
def test_direct_reader_agrees_with_asn1crypto_req12_req13(body: bytes) -> None:
    """The hot-path reader and asn1crypto agree on every input both accept (values, not bytes: REQ-13).

    The converse does not hold: asn1crypto also accepts elements a TimeStampReq cannot contain (an empty BIT STRING
    where certReq belongs, found by this test), which the direct reader refuses."""
    direct = _decode_or_none(body)
    reference = _asn1crypto_or_none(body)
    event(f"direct {'accepts' if direct else 'refuses'}, asn1crypto {'accepts' if reference else 'refuses'}")
    if direct is not None and reference is not None:
        assert direct == reference


def test_indefinite_length_request_falls_back_to_asn1crypto_req13() -> None:
    der = encode_request(
        TimeStampRequest(1, MessageImprint(HASH_ALGORITHMS[2].oid, True, bytes(32)), None, 5, True, ())
    )
    ber = b"\x30\x80" + der[2:] + b"\x00\x00"
    assert decode_request(ber) == decode_request(der)


@given(st.integers(2**31, 2**70) | st.integers(-(2**70), -(2**31) - 1))
def test_versions_wider_than_four_octets_are_refused(version: int) -> None:
    """A hostile version must not reach the rejection text (int-to-text conversion is bounded in Python)."""
    request = TimeStampRequest(version, MessageImprint(HASH_ALGORITHMS[2].oid, True, bytes(32)), None, None, False, ())
    with pytest.raises(ParseError, match="longer than 4 octets"):
        decode_request(encode_request(request))
