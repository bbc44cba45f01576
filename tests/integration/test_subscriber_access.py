"""Subscribers-only TSUs on the real server: IP allow-lists (IPv4 and IPv6 on loopback), API tokens, basic
credentials, TLS client certificates (native and through a trusted proxy), quotas and rate limits enforced exactly
across two processes sharing PostgreSQL, and the request metrics parsed from /metrics.

Issue 6 (subscribers, quotas, observability); SPEC OPS-09 (a token leaves only once recorded), REQ-14 (the
requester never enters the token).
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import re
import secrets
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import psycopg
import pytest
from conftest import LiveTsa, TsaFactory, free_loopback_port, run_stampd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)

from stampd.der.request import encode_request
from stampd.der.token_reader import read_response
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256

pytestmark = pytest.mark.integration

SHA1_OID = "1.3.14.3.2.26"
"""Not in the default hash_algorithms: a request with it is rejected with badAlg."""
WATCH_S = 15.0
"""Longer than the server's subscriber poll (5 s): a change made with `stampd subscribers` is in effect by then."""
CHALLENGE = 'Bearer realm="stampd", Basic realm="stampd"'


def query(digest: bytes | None = None, *, hash_oid: str = SHA256.oid) -> bytes:
    digest = digest if digest is not None else secrets.token_bytes(32 if hash_oid == SHA256.oid else 20)
    return encode_request(
        TimeStampRequest(1, MessageImprint(hash_oid, True, digest), None, secrets.randbits(63), True, ())
    )


def subscribers_only(text: str, *, server: str = "", tsus: str = "") -> str:
    """The `stampd init` configuration with [tsu.default] serving subscribers only, ``server`` lines added to
    [server] and ``tsus`` (more TOML tables) appended."""
    edited = text.replace("qualified = false\n", 'qualified = false\naccess = "subscribers"\n', 1)
    assert edited != text
    if server:
        edited = edited.replace("[server]\n", f"[server]\n{server}\n", 1)
    return edited + tsus


def restricted_tsu(text: str, name: str, subscribers: list[str]) -> str:
    """A second TSU at /NAME with the default TSU's key and certificate, serving only ``subscribers``."""
    block = text[text.index("[tsu.default]") :]
    block = block.replace("[tsu.default]", f"[tsu.{name}]").replace("[tsu.default.key]", f"[tsu.{name}.key]")
    block = block.replace('path = "/"', f'path = "/{name}"', 1)
    return "\n" + block.replace(
        'access = "subscribers"\n', f'access = "subscribers"\nsubscribers = {json.dumps(subscribers)}\n'
    )


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def granted(self) -> bool:
        if self.status != 200:
            return False
        return read_response(self.body).status.status == 0

    @property
    def fail_bits(self) -> tuple[int, ...]:
        return read_response(self.body).status.fail_bits


def post(
    tsa: LiveTsa,
    body: bytes | None = None,
    *,
    path: str = "/",
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    """POST a query to ``tsa`` (its own connection unless ``conn``); granted tokens are remembered for the records
    check at teardown."""
    c = conn or tsa.connection()
    try:
        c.request(
            "POST",
            path,
            body=query() if body is None else body,
            headers={"Content-Type": "application/timestamp-query", **(headers or {})},
        )
        response = c.getresponse()
        answer = Answer(response.status, response.headers, response.read())
    finally:
        if conn is None:
            c.close()
    if answer.status == 200:
        tsa.remember(answer.body)
    return answer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def add_subscriber(tsa: LiveTsa, name: str, *args: str) -> str:
    """`stampd subscribers add NAME ARGS...`; returns its output (the API token is its last line)."""
    result = tsa.stampd("subscribers", "add", name, *args)
    assert f"subscriber {name} added" in result.stdout, result.stdout + result.stderr
    return result.stdout


def token_of(output: str) -> str:
    return output.strip().splitlines()[-1]


def metrics(
    tsa: LiveTsa, conn: http.client.HTTPConnection | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics parsed with prometheus_client's own parser: (sample name, labels) -> value."""
    c = conn or tsa.connection()
    try:
        c.request("GET", "/metrics")
        response = c.getresponse()
        text = response.read().decode()
    finally:
        if conn is None:
            c.close()
    assert response.status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def sqlite_rows(tsa: LiveTsa, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{tsa.records_db}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def wait_until(check: Callable[[], bool], what: str, timeout: float = WATCH_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"not within {timeout} s: {what}")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- IP allow-lists ---


def test_ip_allow_lists_on_ipv4_and_ipv6_loopback(tsa_factory: TsaFactory, tmp_path: Path) -> None:
    """A subscriber listed by 127.0.0.1/32 gets tokens over IPv4 (verified once with `openssl ts -verify`); from
    ::1 the caller is unknown (401) until ::1/128 is listed; `stampd subscribers add` and `disable` take effect
    in the running servers without a signal (the subscriber poll); every token names its subscriber in the
    records and nothing is recorded for a refusal."""
    if not ipv6_loopback():
        pytest.fail("this host has no IPv6 loopback (::1): the IPv6 allow-list cannot be tested")
    tsa = tsa_factory(
        "ec-p256",
        name="access-ip",
        config_edit=subscribers_only,
        before_start=lambda t: add_subscriber(t, "v4", "--ip", "127.0.0.1/32"),
    )
    v6 = LiveTsa(
        name="access-ip-v6", key_type="ec-p256", rsa_pss=False, dir=tsa.dir, host="::1", port=free_loopback_port()
    )
    v6.start()
    try:
        rows_before = sqlite_rows(tsa, "SELECT count(*) FROM tokens")[0][0]
        data = tmp_path / "data.bin"
        data.write_bytes(b"subscribers only\n")
        tsq, tsr = tmp_path / "q.tsq", tmp_path / "r.tsr"
        subprocess.run(["openssl", "ts", "-query", "-data", data, "-sha256", "-cert", "-out", tsq], check=True)
        v4_answer = post(tsa, tsq.read_bytes())
        assert v4_answer.status == 200 and v4_answer.granted
        tsr.write_bytes(v4_answer.body)
        verified = subprocess.run(
            [
                "openssl",
                "ts",
                "-verify",
                "-queryfile",
                tsq,
                "-in",
                tsr,
                "-CAfile",
                tsa.root_pem,
                "-untrusted",
                tsa.issuing_pem,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verified.returncode == 0 and "Verification: OK" in verified.stdout, verified.stderr

        refused = post(v6)
        assert refused.status == 401 and refused.headers["WWW-Authenticate"] == CHALLENGE
        assert refused.headers["X-Request-Id"]

        add_subscriber(tsa, "v6", "--ip", "::1/128")
        wait_until(lambda: post(v6).granted, "::1/128 listed: tokens over IPv6")
        assert post(tsa).granted  # IPv4 unaffected

        tsa.stampd("subscribers", "disable", "v4")
        wait_until(lambda: post(tsa).status == 403, "v4 disabled: 403")
        assert post(v6).granted

        refusals = value(metrics(v6), "stampd_subscriber_refusals_total", tsu="/", reason="unauthorized")
        assert refusals >= 1
        assert value(metrics(tsa), "stampd_subscriber_refusals_total", tsu="/", reason="forbidden") >= 1
    finally:
        v6.stop()
    v6.check_granted_are_recorded()
    rows = sqlite_rows(tsa, "SELECT subscriber, requester FROM tokens")
    granted = len(tsa.granted) + len(v6.granted)
    assert len(rows) - rows_before == granted  # the refusals recorded nothing
    by_subscriber = Counter(s for s, _ in rows)
    assert by_subscriber["v4"] >= 2 and by_subscriber["v6"] >= 2
    assert by_subscriber["v4"] + by_subscriber["v6"] == granted
    assert {r for s, r in rows if s == "v6"} == {"::1"}
    assert {r for s, r in rows if s == "v4"} == {"127.0.0.1"}


def test_x_forwarded_for_from_a_loopback_peer_that_is_no_trusted_proxy_is_ignored(tsa_factory: TsaFactory) -> None:
    """No server.trusted_proxies: a local process claiming a subscriber's address in X-Forwarded-For is still
    127.0.0.1. uvicorn's own proxy-header handling (which believes 127.0.0.1 and ::1 by default and would rewrite
    the client address before stampd looks) is off, so only stampd's trusted_proxies decide."""

    def prepare(t: LiveTsa) -> None:
        add_subscriber(t, "faraway", "--ip", "192.0.2.7/32")
        add_subscriber(t, "local", "--ip", "127.0.0.1/32")

    tsa = tsa_factory("ec-p256", name="access-xff", config_edit=subscribers_only, before_start=prepare)
    assert post(tsa, headers={"X-Forwarded-For": "192.0.2.7"}).granted
    assert post(tsa, headers={"X-Forwarded-For": "192.0.2.7", "X-Forwarded-Proto": "https"}).granted
    assert sqlite_rows(tsa, "SELECT subscriber, requester FROM tokens") == [("local", "127.0.0.1")] * 2


def test_sighup_switches_a_tsu_between_public_and_subscribers(tsa_factory: TsaFactory) -> None:
    """`stampd reload` (SIGHUP) applies a TSU's new access: public, then subscribers only (the subscribers and the
    usage ledger are opened then), then public again."""
    tsa = tsa_factory("ec-p256", name="access-reload")
    public = tsa.config.read_text()
    assert post(tsa).granted
    token = token_of(add_subscriber(tsa, "later", "--token", "--quota", "1000/day"))
    tsa.config.write_text(subscribers_only(public))
    tsa.stampd("reload")
    wait_until(lambda: post(tsa).status == 401, "reloaded: subscribers only", timeout=10)
    assert post(tsa, headers=bearer(token)).granted
    tsa.config.write_text(public)
    tsa.stampd("reload")
    wait_until(lambda: post(tsa).granted, "reloaded: public again", timeout=10)
    assert tsa.log_text().count("configuration reloaded") == 2
    assert sqlite_rows(tsa, "SELECT count(*) FROM tokens WHERE subscriber = 'later'") == [(1,)]


# --- tokens, basic credentials, metrics ---


@pytest.fixture(scope="module")
def creds_tsa(
    tsa_factory: TsaFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveTsa, dict[str, str]]]:
    """A TSA whose default TSU serves every subscriber and whose TSU /restricted serves only "other"; returns
    it and the subscribers' API tokens."""
    tokens: dict[str, str] = {}
    password_file = tmp_path_factory.mktemp("secrets") / "bob.pass"
    password_file.write_text("correct horse battery\n")

    def prepare(t: LiveTsa) -> None:
        tokens["tok"] = token_of(add_subscriber(t, "tok", "--token", "--quota", "3/day"))
        tokens["other"] = token_of(add_subscriber(t, "other", "--token"))
        tokens["off"] = token_of(add_subscriber(t, "off", "--token"))
        add_subscriber(t, "bob", "--basic-user", "bob", "--password-file", str(password_file))
        t.stampd("subscribers", "disable", "off")

    tsa = tsa_factory(
        "ec-p256",
        name="access-creds",
        config_edit=lambda text: subscribers_only(
            text, tsus=restricted_tsu(subscribers_only(text), "restricted", ["other"])
        ),
        before_start=prepare,
    )
    yield tsa, tokens


def test_tokens_and_basic_credentials(creds_tsa: tuple[LiveTsa, dict[str, str]]) -> None:
    """Right bearer token or basic password: a token; wrong ones: 401 with the challenge; a disabled subscriber
    and a TSU listing other subscribers: 403. Nothing is recorded for a refusal, each refusal is counted, and
    each granted token's row names its subscriber."""
    tsa, tokens = creds_tsa
    count = "SELECT count(*) FROM tokens"
    rows_before = sqlite_rows(tsa, count)[0][0]
    before = metrics(tsa)
    granted = Counter[str]()

    answer = post(tsa, headers=bearer(tokens["other"]))
    assert answer.granted
    granted["other"] += 1
    answer = post(tsa, headers=basic("bob", "correct horse battery"))
    assert answer.granted
    granted["bob"] += 1
    assert post(tsa, headers=basic("bob", "correct horse battery")).granted  # the slow hash ran once; cached now
    granted["bob"] += 1
    answer = post(tsa, path="/restricted", headers=bearer(tokens["other"]))
    assert answer.granted
    granted["other"] += 1

    unauthorized = [
        post(tsa),  # nothing presented, and 127.0.0.1 is nobody's
        post(tsa, headers=bearer("stampd_" + "x" * 43)),
        post(tsa, headers=basic("bob", "wrong password!")),
        post(tsa, headers=basic("nobody", "correct horse battery")),
        post(tsa, headers={"Authorization": "Negotiate abc"}),
        post(tsa, b"not even a request", headers=bearer("wrong")),  # refused before the body is read
    ]
    assert [a.status for a in unauthorized] == [401] * 6
    assert all(a.headers["WWW-Authenticate"] == CHALLENGE for a in unauthorized)
    forbidden = [
        post(tsa, headers=bearer(tokens["off"])),  # disabled
        post(tsa, path="/restricted", headers=bearer(tokens["tok"])),  # not listed by the TSU
        post(tsa, path="/restricted", headers=basic("bob", "correct horse battery")),
    ]
    assert [a.status for a in forbidden] == [403] * 3

    after = metrics(tsa)
    delta = {
        (path, reason): value(after, "stampd_subscriber_refusals_total", tsu=path, reason=reason)
        - value(before, "stampd_subscriber_refusals_total", tsu=path, reason=reason)
        for path in ("/", "/restricted")
        for reason in ("unauthorized", "forbidden")
    }
    assert delta == {
        ("/", "unauthorized"): 6,
        ("/", "forbidden"): 1,
        ("/restricted", "unauthorized"): 0,
        ("/restricted", "forbidden"): 2,
    }
    assert sqlite_rows(tsa, count)[0][0] - rows_before == sum(granted.values())
    recorded = Counter(
        s for (s,) in sqlite_rows(tsa, f"SELECT subscriber FROM tokens ORDER BY rowid LIMIT -1 OFFSET {rows_before}")
    )
    assert recorded == granted


def test_quota_counts_only_granted_tokens(creds_tsa: tuple[LiveTsa, dict[str, str]]) -> None:
    """ "tok" may have 3 tokens a day: five badAlg rejections first take nothing from it (each reservation is
    released), then three tokens, then 429 with Retry-After until the next UTC day."""
    tsa, tokens = creds_tsa
    rejected = [post(tsa, query(hash_oid=SHA1_OID), headers=bearer(tokens["tok"])) for _ in range(5)]
    assert all(a.status == 200 and a.fail_bits == (0,) for a in rejected)  # badAlg is bit 0
    assert [post(tsa, headers=bearer(tokens["tok"])).granted for _ in range(3)] == [True] * 3
    over = post(tsa, headers=bearer(tokens["tok"]))
    assert over.status == 429
    now = datetime.datetime.now(datetime.UTC)
    midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    assert abs(int(over.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5
    assert sqlite_rows(tsa, "SELECT count(*) FROM tokens WHERE subscriber = 'tok'")[0][0] == 3


def test_request_metrics_by_tsu_status_and_fail_info(creds_tsa: tuple[LiveTsa, dict[str, str]]) -> None:
    """After good, badAlg-rejected and 401 requests, stampd_requests_total counts each under {tsu, status,
    fail_info}; the latency histogram has its buckets, cumulative up to +Inf = count. Request ids are echoed."""
    tsa, tokens = creds_tsa
    before = metrics(tsa)
    for _ in range(4):
        assert post(tsa, headers=bearer(tokens["other"])).granted
    for _ in range(2):
        assert post(tsa, query(hash_oid=SHA1_OID), headers=bearer(tokens["other"])).fail_bits == (0,)
    for _ in range(3):
        assert post(tsa, headers=bearer("wrong")).status == 401
    echoed = post(tsa, headers={**bearer(tokens["other"]), "X-Request-Id": "billing-run.42"})
    assert echoed.headers["X-Request-Id"] == "billing-run.42"
    after = metrics(tsa)

    def delta(**labels: str) -> float:
        return value(after, "stampd_requests_total", **labels) - value(before, "stampd_requests_total", **labels)

    assert delta(tsu="/", status="200", fail_info="") == 5
    assert delta(tsu="/", status="200", fail_info="badAlg") == 2
    assert delta(tsu="/", status="401", fail_info="") == 3
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in after.items()
        if name == "stampd_request_duration_seconds_bucket" and dict(labels)["tsu"] == "/"
    }
    assert {"0.001", "0.01", "0.1", "1.0", "+Inf"} <= buckets.keys()
    ordered = [buckets[le] for le in sorted(buckets, key=float)]
    assert ordered == sorted(ordered)  # cumulative
    assert buckets["+Inf"] == value(after, "stampd_request_duration_seconds_count", tsu="/") >= 10


# --- TLS client certificates ---


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(ip))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]


def make_tls_pki(directory: Path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1, and client certificates "known" and "unknown"."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("stampd test client CA", ca_key, None, ca=True)
    ca_path, _ = write("ca", ca_cert, ca_key)
    issuer = (ca_cert.subject, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = write(
        "server",
        _issue("127.0.0.1", server_key, issuer, usage=ExtendedKeyUsageOID.SERVER_AUTH, ip="127.0.0.1"),
        server_key,
    )
    clients = {}
    for name in ("known", "unknown"):
        key = ec.generate_private_key(ec.SECP256R1())
        clients[name] = write(name, _issue(f"client {name}", key, issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH), key)
    return Pki(ca_path, *server, clients)


@dataclass
class TlsTsa(LiveTsa):
    """A LiveTsa served over HTTPS: connections trust the test CA and present ``client`` when set, from
    ``source`` (a loopback address other than the trusted proxy's)."""

    ca: Path | None = None
    client: tuple[Path, Path] | None = None
    source: str | None = None

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        context = ssl.create_default_context(cafile=self.ca)
        if self.client is not None:
            context.load_cert_chain(*self.client)
        source = (self.source, 0) if self.source else None
        return http.client.HTTPSConnection(
            self.host, self.port, timeout=timeout, context=context, source_address=source
        )


def test_client_certificate_over_real_tls_and_through_a_trusted_proxy(tmp_path: Path) -> None:
    """Native TLS with server.tls_client_ca: the registered client certificate gets a token, another certificate
    of the same CA gets 401. 127.0.0.1 is the trusted proxy: its X-Client-Certificate (URL-encoded PEM, as nginx's
    $ssl_client_escaped_cert) identifies the subscriber; the same header from 127.0.0.3 is ignored (401)."""
    pki = make_tls_pki(tmp_path / "tls")
    tsa = TlsTsa(
        name="access-tls",
        key_type="ec-p256",
        rsa_pss=False,
        dir=tmp_path / "tsa",
        host="127.0.0.1",
        port=free_loopback_port(),
        ca=pki.ca,
    )
    run_stampd("init", tsa.dir, "--key-type", "ec-p256", "--listen", f"{tsa.host}:{tsa.port}")
    server = (
        f'tls_certificate = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\ntls_client_ca = "{pki.ca}"\n'
        'trusted_proxies = ["127.0.0.1/32"]'
    )
    tsa.config.write_text(subscribers_only(tsa.config.read_text(), server=server))
    add_subscriber(tsa, "certified", "--cert", str(pki.clients["known"][0]))
    tsa.start()
    try:
        direct = TlsTsa(**{**tsa.__dict__, "source": "127.0.0.3"})
        direct.client = pki.clients["known"]
        known = post(direct)
        assert known.granted, (known.status, known.body)
        direct.client = pki.clients["unknown"]
        unknown = post(direct)
        assert unknown.status == 401 and b"unknown client certificate" in unknown.body
        direct.client = None
        assert post(direct).status == 401  # no certificate, and 127.0.0.3 is nobody's

        header = {"X-Client-Certificate": urllib.parse.quote(pki.clients["known"][0].read_text())}
        assert post(tsa, headers=header).granted  # from the trusted proxy 127.0.0.1
        ignored = post(direct, headers=header)
        assert ignored.status == 401  # a client cannot claim a certificate by header
        tsa.granted.update(direct.granted)
    finally:
        tsa.stop()
    tsa.check_granted_are_recorded()
    rows = sqlite_rows(tsa, "SELECT subscriber, requester FROM tokens")
    assert sorted(rows) == [("certified", "127.0.0.1"), ("certified", "127.0.0.3")]


# --- quotas and rates across two processes on PostgreSQL ---


def _pg_rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def _hammer(
    nodes: list[LiveTsa], count: int | None, headers: dict[str, str], *, seconds: float = 0.0, threads: int = 16
) -> list[Answer]:
    """``count`` requests (or as many as fit in ``seconds``) from ``threads`` threads, spread over ``nodes``, each
    thread on keep-alive connections of its own."""
    answers: list[Answer] = []
    lock = threading.Lock()
    remaining = [count]
    stop_at = time.monotonic() + seconds

    def more() -> bool:
        with lock:
            if count is None:
                return time.monotonic() < stop_at
            if remaining[0] == 0:
                return False
            remaining[0] -= 1
            return True

    def client(index: int) -> None:
        node = nodes[index % len(nodes)]
        conn = node.connection()
        try:
            while more():
                answer = post(node, headers=headers, conn=conn)
                with lock:
                    answers.append(answer)
        finally:
            conn.close()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))
    return answers


UNLISTED_ADDRESS = "127.0.0.2"
"""A loopback address in no subscriber's networks: a request from it without credentials identifies nobody."""


def _unauthorised(nodes: list[LiveTsa], each: int) -> list[Answer]:
    """``each`` requests per node and kind that identify nobody: no credentials from an unlisted address, and a
    wrong API token or wrong basic credentials from the listed 127.0.0.1 (which never excuses them)."""
    kinds: list[tuple[str | None, dict[str, str]]] = [
        (UNLISTED_ADDRESS, {}),
        (None, bearer("stampd_" + secrets.token_urlsafe(32))),
        (None, basic("fifty", "not-the-password")),
    ]

    def client(job: tuple[LiveTsa, str | None, dict[str, str]]) -> list[Answer]:
        node, source, headers = job
        source_address = (source, 0) if source is not None else None
        conn = http.client.HTTPConnection(node.host, node.port, timeout=30, source_address=source_address)
        try:
            return [post(node, headers=headers, conn=conn) for _ in range(each)]
        finally:
            conn.close()

    jobs = [(node, source, headers) for node in nodes for source, headers in kinds]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [answer for answers in pool.map(client, jobs) for answer in answers]


def test_quota_and_rate_exact_across_two_processes_on_postgresql(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Two `stampd serve` processes share PostgreSQL. 200 concurrent requests of a 50/day subscriber, while 120
    requests that identify nobody (no credentials from an unlisted address, a wrong token, a wrong password) go to
    both nodes: exactly 50 granted tokens in the records, every other answer of the subscriber 429 with
    Retry-After, every unidentified one 401 with nothing recorded or counted for it, and `stampd usage report`
    says 50. Then a 5/s subscriber hammered for 3 s: never more than 5 granted tokens dated in one second."""
    directory = tmp_path / "tsa"
    run_stampd("init", directory)
    config = directory / "stampd.toml"
    text = re.sub(r'(?m)^url = "sqlite:///records.sqlite3"', f'url = "{pg_url}"', config.read_text())
    config.write_text(subscribers_only(text))
    run_stampd("db", "upgrade", "-c", config)
    nodes = [
        LiveTsa(
            name=f"quota{i}",
            key_type="ec-p256",
            rsa_pss=False,
            dir=directory,
            host="127.0.0.1",
            port=free_loopback_port(),
            check_records=False,
        )
        for i in range(2)
    ]
    add_subscriber(nodes[0], "fifty", "--ip", "127.0.0.1/32", "--quota", "50/day")
    rate_token = token_of(add_subscriber(nodes[0], "five", "--token", "--rate", "5/s"))
    for node in nodes:
        node.start()
    try:
        with ThreadPoolExecutor(1) as background:
            refused = background.submit(_unauthorised, nodes, 20)
            answers = _hammer(nodes, 200, {})
            unauthorised = refused.result()
        refusals = [
            value(metrics(node), "stampd_subscriber_refusals_total", tsu="/", reason="unauthorized") for node in nodes
        ]
        rate_answers = _hammer(nodes, None, bearer(rate_token), seconds=3.0, threads=8)
    finally:
        for node in nodes:
            node.stop()

    assert len(unauthorised) == 2 * 3 * 20
    assert Counter(a.status for a in unauthorised) == {401: 120}
    assert all(a.headers["WWW-Authenticate"] == CHALLENGE for a in unauthorised)
    assert refusals == [60.0, 60.0]  # each node counted its own 60, and nothing else as unauthorised
    assert len(answers) == 200
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 50, 429: 150}, statuses
    assert all(a.granted for a in answers if a.status == 200)
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status == 429)
    recorded = {
        int(str(s), 16): bytes(t)
        for s, t in _pg_rows(pg_url, "SELECT serial, token FROM tokens WHERE subscriber = 'fifty'")
    }
    assert len(recorded) == 50
    granted = {**nodes[0].granted, **nodes[1].granted}
    assert all(granted[s] == token for s, token in recorded.items())  # byte for byte, as the clients got them

    today = datetime.datetime.now(datetime.UTC).date()
    report = run_stampd(
        "usage",
        "report",
        "--from",
        (today - datetime.timedelta(days=1)).isoformat(),
        "--to",
        (today + datetime.timedelta(days=2)).isoformat(),
        "--format",
        "json",
        "-c",
        config,
    )
    rows = {r["subscriber"]: r for r in json.loads(report.stdout)}
    assert rows["fifty"]["tokens"] == 50 and rows["fifty"]["tsu"] == "default"
    assert set(rows) == {"fifty", "five"}, rows  # the refused requests are nobody's usage

    rate_statuses = Counter(a.status for a in rate_answers)
    assert set(rate_statuses) == {200, 429} and rate_statuses[429] > rate_statuses[200], rate_statuses
    assert all(a.headers["Retry-After"] == "1" for a in rate_answers if a.status == 429)
    per_second = Counter(
        int(us) // 1_000_000 for (us,) in _pg_rows(pg_url, "SELECT gen_time_us FROM tokens WHERE subscriber = 'five'")
    )
    assert sum(per_second.values()) == rate_statuses[200] == rows["five"]["tokens"]
    # The rate counts requests admitted per second of the ledger's clock: each counter reached 5 and none passed it.
    rate_counters = [
        int(count)
        for (count,) in _pg_rows(
            pg_url, "SELECT count FROM usage_counters WHERE subscriber = 'five' AND \"window\" LIKE 's:%'"
        )
    ]
    assert rate_counters and max(rate_counters) == 5, rate_counters
    # A token's genTime follows its admission by its signing and commit, so a second of genTimes may hold the end
    # of the previous second's admissions: never more than twice the rate, and never more than the rate overall.
    assert max(per_second.values()) <= 2 * 5, per_second
    assert sum(per_second.values()) <= 5 * (max(per_second) - min(per_second) + 2), per_second
    by_subscriber = dict(_pg_rows(pg_url, "SELECT subscriber, count(*) FROM tokens WHERE tsu = 'default' GROUP BY 1"))
    assert by_subscriber == {"fifty": 50, "five": rate_statuses[200]}, by_subscriber  # no NULL, no one else
    assert by_subscriber["five"] + 50 == len(nodes[0].granted) + len(nodes[1].granted)
    assert len(per_second) >= 3
