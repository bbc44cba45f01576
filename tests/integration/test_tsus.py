"""Several TSUs in one server, and the life cycle of their keys on a live server: qualified tokens, compromise under
load, reload without dropped requests, HSM keys, rollover to a next key, termination.

SPEC ETS-03, ETS-05, CRT-06, OPS-05, OPS-07, OPS-08, OPS-10, OPS-11, STS-06, ALG-01..03. Every TSA here is a
`stampd init` directory served by a real `stampd serve`; keys, certificates and states are changed only through the
`stampd` commands an operator would run, and tokens are checked with `openssl ts -verify` and stampd's verifier.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms, tsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from stampd.der.request import encode_request
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file
from stampd.verify import verify_timestamp

sys.path.insert(0, str(Path(__file__).parents[1]))

from conftest import LiveTsa, TimeStampResp, TsaFactory, run_stampd

from hsm import TOKEN_KEYS, SoftHsm, softhsm

__all__ = ["softhsm"]  # the session fixture, re-exported so pytest finds it here

pytestmark = pytest.mark.integration

QUALIFIED_EXTENSIONS = bytes.fromhex(
    "A1 1B 30 19 06 08 2B 06 01 05 05 07 01 03 04 0D 30 0B 30 09 06 07 04 00 81 97 5E 01 01"
)
"""SPEC ETS-05, written out here rather than imported, so that the test does not trust stampd's constant."""
SYSTEM_FAILURE = bytes.fromhex("03 05 06 00 00 00 40")
"""PKIFailureInfo with only systemFailure (bit 25) set, DER (SPEC STS-06)."""
EXTRA_POLICY = "1.2.3.4.5"


# --- requests and replies ---


def make_query(*, policy: str | None = None, cert_req: bool = True) -> tuple[bytes, bytes]:
    """(DER TimeStampReq over a fresh SHA-256 digest, with a nonce, the digest)."""
    digest = secrets.token_bytes(32)
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), policy, secrets.randbits(63), cert_req, ())
    return encode_request(request), digest


def status_of(reply: bytes) -> str:
    return str(TimeStampResp.load(reply)["status"]["status"].native)


def signed_data_of(reply: bytes) -> cms.SignedData:
    resp = TimeStampResp.load(reply)
    assert resp["status"]["status"].native == "granted", resp["status"].native
    return resp["time_stamp_token"]["content"]


def tst_info_der(reply: bytes) -> bytes:
    return bytes(signed_data_of(reply)["encap_content_info"]["content"].contents)


def tst_info(reply: bytes) -> tsp.TSTInfo:
    return tsp.TSTInfo.load(tst_info_der(reply))


def serial_of(reply: bytes) -> int:
    return int(tst_info(reply)["serial_number"].native)


def signer_serial(reply: bytes) -> int:
    """The certificate serial the SignerInfo names (sid issuerAndSerialNumber)."""
    (signer_info,) = signed_data_of(reply)["signer_infos"]
    return int(signer_info["sid"].chosen["serial_number"].native)


def ess_cert_id(reply: bytes) -> tuple[bytes, int]:
    """(certHash, issuerSerial.serialNumber) of the signing-certificate-v2 attribute's first ESSCertIDv2."""
    (signer_info,) = signed_data_of(reply)["signer_infos"]
    (attribute,) = [a for a in signer_info["signed_attrs"] if a["type"].native == "signing_certificate_v2"]
    cert_id = attribute["values"][0]["certs"][0]
    return bytes(cert_id["cert_hash"].native), int(cert_id["issuer_serial"]["serial_number"].native)


def assert_system_failure(reply: bytes) -> None:
    """SPEC STS-06, OPS-10, OPS-11: rejection, failInfo systemFailure only, and no token."""
    resp = TimeStampResp.load(reply)
    assert resp["status"]["status"].native == "rejection", resp["status"].native
    assert resp["status"]["fail_info"].dump() == SYSTEM_FAILURE
    assert resp["time_stamp_token"].native is None


def default_policy(tsa: LiveTsa, tsu: str) -> str:
    return str(tomllib.loads(tsa.config.read_text())["tsu"][tsu]["default_policy"])


def certificate_at(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def events(tsa: LiveTsa, kind: str) -> list[tuple[str | None, dict[str, object]]]:
    """(tsu, detail) of every event of ``kind`` in the TSA's records, oldest first."""
    rows = tsa._query(f"SELECT tsu, detail FROM events WHERE kind = '{kind}' ORDER BY id")
    return [(None if tsu is None else str(tsu), json.loads(str(detail))) for tsu, detail in rows]


def tsu_list(tsa: LiveTsa) -> dict[str, dict[str, object]]:
    return {info["name"]: info for info in json.loads(tsa.stampd("tsu", "list", "--json").stdout)}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


# --- verifiers ---


@pytest.fixture(scope="session")
def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("the openssl command is not installed: the OpenSSL interoperability tests cannot run")
    return path


def assert_openssl_verifies(tsa: LiveTsa, query: bytes, reply: bytes, tmp: Path) -> None:
    """`openssl ts -verify` against the demo root, with the issuing CA as untrusted intermediate."""
    name = secrets.token_hex(6)
    query_file, reply_file = tmp / f"{name}.tsq", tmp / f"{name}.tsr"
    query_file.write_bytes(query)
    reply_file.write_bytes(reply)
    result = subprocess.run(
        [
            *("openssl", "ts", "-verify", "-queryfile", query_file, "-in", reply_file),
            *("-CAfile", tsa.root_pem, "-untrusted", tsa.issuing_pem),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and "Verification: OK" in result.stdout, result.stdout + result.stderr


def assert_stampd_verifies(tsa: LiveTsa, digest: bytes, reply: bytes) -> None:
    report = verify_timestamp(
        reply,
        digest=digest,
        anchors=[certificate_at(tsa.root_pem)],
        extra_certs=[certificate_at(tsa.issuing_pem)],
    )
    assert report.ok, [f"{c.name}: {c.detail}" for c in report.failures]


# --- load ---


@dataclass(frozen=True)
class Exchange:
    path: str
    query: bytes
    received: float
    """time.monotonic() when the reply (or the error) arrived."""
    http_status: int | None
    reply: bytes
    error: str | None = None

    @property
    def granted(self) -> bool:
        return self.http_status == 200 and self.error is None and status_of(self.reply) == "granted"


class Load:
    """``threads`` clients, each on its own keep-alive connection, cycling through ``paths`` until stopped."""

    def __init__(self, tsa: LiveTsa, paths: list[str], threads: int) -> None:
        self.tsa = tsa
        self.paths = paths
        self.stop_event = threading.Event()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def _client(self, index: int) -> None:
        conn = self.tsa.connection(timeout=10)
        i = index
        while not self.stop_event.is_set():
            path = self.paths[i % len(self.paths)]
            i += 1
            query, _ = make_query()
            try:
                status, _, reply = self.tsa.post(query, path=path, conn=conn)
                exchange = Exchange(path, query, time.monotonic(), status, reply)
            except (OSError, http.client.HTTPException) as e:
                exchange = Exchange(path, query, time.monotonic(), None, b"", f"{type(e).__name__}: {e}")
                conn.close()
                conn = self.tsa.connection(timeout=10)
            with self._lock:
                self.exchanges.append(exchange)
        conn.close()


# --- TSAs ---


def init_with_tsus(*specs: str) -> Callable[[LiveTsa], None]:
    """A ``before_start`` that makes the factory's directory again with `stampd init --tsu SPEC ...`."""

    def before_start(tsa: LiveTsa) -> None:
        tsus = [arg for spec in specs for arg in ("--tsu", spec)]
        run_stampd("init", tsa.dir, "--key-type", tsa.key_type, "--listen", f"{tsa.host}:{tsa.port}", *tsus, "--force")

    return before_start


def edit_tsu_table(text: str, tsu: str, edit: Callable[[str], str]) -> str:
    """Apply ``edit`` to the body of the [tsu.NAME] table only."""
    match = re.search(rf"(?ms)^\[tsu\.{re.escape(tsu)}\]\n(.*?)(?=^\[)", text)
    assert match is not None, f"no [tsu.{tsu}] table"
    body = edit(match.group(1))
    assert body != match.group(1), f"the edit changed nothing in [tsu.{tsu}]"
    return text[: match.start(1)] + body + text[match.end(1) :]


def issue_tsu_certificate(tsa: LiveTsa, csr_pem: Path, out: Path) -> x509.Certificate:
    """The demo issuing CA certifies the key of ``csr_pem`` with the TSU profile (SPEC CRT-01..06): critical EKU
    timeStamping only, critical keyUsage digitalSignature, not a CA, and a privateKeyUsagePeriod in the validity."""
    request = x509.load_pem_x509_csr(csr_pem.read_bytes())
    assert request.is_signature_valid
    issuer = certificate_at(tsa.issuing_pem)
    issuer_key = load_encrypted_key(
        tsa.pki / "issuing-ca-key.pem", read_passphrase_file(tsa.dir / "secrets" / "ca.pass")
    )
    start = issuer.not_valid_before_utc
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(issuer.subject)
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(x509.PrivateKeyUsagePeriod(not_before=start, not_after=start + timedelta(days=365)), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    certificate = builder.sign(issuer_key, algorithm)
    out.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


# === several TSUs ===


def test_several_tsus_routes_qualified_tokens_ets03_ets05(
    tsa_factory: TsaFactory, openssl: str, tmp_path: Path
) -> None:
    """ETS-03, ETS-05, OPS-07 (one key per TSU): /rfc3161, /qualified and / (the first TSU) each answer with their
    own key, certificate and default policy; only /qualified tokens end with the exact non-critical qcStatements
    extension; GET /qualified/certs serves that TSU's chain; `tsu list` shows both active."""
    tsa = tsa_factory("ec-p256", name="tsus-multi", before_start=init_with_tsus("rfc3161", "qualified:qualified"))
    replies: dict[str, bytes] = {}
    for path in ("/rfc3161", "/qualified", "/"):
        query, digest = make_query()
        status, headers, reply = tsa.post(query, path=path)
        assert status == 200 and headers["Content-Type"] == "application/timestamp-reply"
        assert_openssl_verifies(tsa, query, reply, tmp_path)
        assert_stampd_verifies(tsa, digest, reply)
        replies[path] = reply

    rfc3161, qualified = tst_info(replies["/rfc3161"]), tst_info(replies["/qualified"])
    # ETS-05: exactly the qcStatements bytes end the qualified TSTInfo; ETS-03: not critical
    assert tst_info_der(replies["/qualified"]).endswith(QUALIFIED_EXTENSIONS)
    (extension,) = qualified["extensions"]
    assert extension["extn_id"].dotted == "1.3.6.1.5.5.7.1.3"
    assert extension["critical"].native is False
    der = extension.dump()
    assert der[2 + 2 + der[3]] == 0x04  # extnValue follows extnID: no critical BOOLEAN (DER omits FALSE)
    # non-qualified: no extensions at all (ETS-05 "MUST NOT carry it")
    assert rfc3161["extensions"].native is None
    assert tst_info(replies["/"])["extensions"].native is None

    certs = {
        name: certificate_at(tsa.pki / file)
        for name, file in (("rfc3161", "tsu.pem"), ("qualified", "tsu-qualified.pem"))
    }
    assert certs["rfc3161"].public_key() != certs["qualified"].public_key()
    for path, tsu in (("/rfc3161", "rfc3161"), ("/qualified", "qualified"), ("/", "rfc3161")):
        assert signer_serial(replies[path]) == certs[tsu].serial_number, path
        cert_hash, _ = ess_cert_id(replies[path])
        assert cert_hash == hashlib.sha256(certs[tsu].public_bytes(serialization.Encoding.DER)).digest(), path
        assert tst_info(replies[path])["policy"].dotted == default_policy(tsa, tsu), path
    assert default_policy(tsa, "rfc3161") != default_policy(tsa, "qualified")

    conn = tsa.connection()
    conn.request("GET", "/qualified/certs")
    response = conn.getresponse()
    chain = x509.load_pem_x509_certificates(response.read())
    conn.close()
    assert response.status == 200
    assert chain[0] == certs["qualified"]
    assert certificate_at(tsa.issuing_pem) in chain

    listed = tsu_list(tsa)
    assert {name: (info["state"], info["path"], info["qualified"]) for name, info in listed.items()} == {
        "rfc3161": ("active", "/rfc3161", False),
        "qualified": ("active", "/qualified", True),
    }


# === compromise (OPS-10) ===


def test_compromise_under_load_stops_the_tsu_ops10(tsa_factory: TsaFactory, tmp_path: Path) -> None:
    """OPS-10, STS-06: `stampd tsu compromise qualified` while 6 clients hammer both TSUs. From (return of the
    command + 0.2 s) on, /qualified only answers systemFailure; every /qualified token granted is in the records; the
    other TSU never stops; the report names exactly the recorded tokens since --since; the state survives a
    restart."""
    test_started = datetime.now(UTC)
    tsa = tsa_factory("ec-p256", name="tsus-compromise", before_start=init_with_tsus("rfc3161", "qualified:qualified"))
    since = (test_started - timedelta(minutes=1)).replace(microsecond=0)
    report_file = tmp_path / "compromise.json"
    with Load(tsa, ["/qualified", "/rfc3161"], threads=6) as load:
        began = time.monotonic()
        time.sleep(1.2)
        tsa.stampd("tsu", "compromise", "qualified", "--since", since.isoformat(), "--report", report_file)
        returned = time.monotonic()
        time.sleep(max(0.0, began + 3.0 - time.monotonic(), returned + 1.0 - time.monotonic()))

    exchanges = load.exchanges
    assert all(e.error is None and e.http_status == 200 for e in exchanges), [e.error for e in exchanges][:3]
    qualified = [e for e in exchanges if e.path == "/qualified"]
    other = [e for e in exchanges if e.path == "/rfc3161"]
    assert any(e.granted for e in qualified if e.received < returned), "no /qualified token before the compromise"
    late = [e for e in qualified if e.received > returned + 0.2]
    assert late, "no /qualified request after the compromise"
    assert not [e for e in late if e.granted], "tokens granted after the compromise"
    for e in qualified:
        if not e.granted:
            assert_system_failure(e.reply)
    assert all(e.granted for e in other), "the other TSU stopped granting"
    assert any(e.received > returned + 0.5 for e in other)

    recorded = tsa.records()
    granted_qualified = {serial_of(e.reply): e.reply for e in qualified if e.granted}
    assert all(recorded.get(s) == reply for s, reply in granted_qualified.items()), "granted but not recorded"

    report = json.loads(report_file.read_text())
    since_us = int(since.timestamp()) * 1_000_000
    in_records = {
        int(str(s), 16)
        for (s,) in tsa._query(f"SELECT serial FROM tokens WHERE tsu = 'qualified' AND gen_time_us >= {since_us}")
    }
    assert report["tsu"] == "qualified"
    assert {int(t["serial"]) for t in report["tokens"]} == in_records
    assert set(granted_qualified) <= in_records
    assert [tsu for tsu, _ in events(tsa, "tsu.compromised")] == ["qualified"]
    assert tsu_list(tsa)["qualified"]["state"] == "compromised"
    assert tsu_list(tsa)["rfc3161"]["state"] == "active"

    tsa.stop()
    tsa.start()
    status, _, reply = tsa.post(make_query()[0], path="/qualified")
    assert status == 200
    assert_system_failure(reply)
    status, _, reply = tsa.post(make_query()[0], path="/rfc3161")
    assert status == 200 and status_of(reply) == "granted"


# === reload ===


def test_reload_changes_policies_without_dropping_requests(tsa_factory: TsaFactory) -> None:
    """`stampd reload` (SIGHUP) under load from 4 clients: a new accepted policy is granted within seconds, no request
    fails, `config.reloaded` is recorded; a broken configuration is refused (`config.reload_failed`) and the server
    keeps serving what it had."""
    tsa = tsa_factory("ec-p256", name="tsus-reload", before_start=init_with_tsus("rfc3161", "qualified:qualified"))
    original = tsa.config.read_text()

    def extra_policy() -> bytes:
        status, _, reply = tsa.post(make_query(policy=EXTRA_POLICY)[0], path="/rfc3161")
        assert status == 200
        return reply

    before = TimeStampResp.load(extra_policy())["status"]
    assert before["status"].native == "rejection" and before["fail_info"].native == {"unaccepted_policy"}

    with Load(tsa, ["/rfc3161"], threads=4) as load:
        time.sleep(0.5)
        tsa.config.write_text(
            edit_tsu_table(
                original,
                "rfc3161",
                lambda body: re.sub(r'(?m)^accepted_policies = \["', f'accepted_policies = ["{EXTRA_POLICY}", "', body),
            )
        )
        tsa.stampd("reload")
        deadline = time.monotonic() + 5
        while status_of(reply := extra_policy()) != "granted":
            assert time.monotonic() < deadline, "the new policy was not granted within 5 s of the reload"
            time.sleep(0.05)
        assert tst_info(reply)["policy"].dotted == EXTRA_POLICY
        wait_for(lambda: bool(events(tsa, "config.reloaded")), 5, "config.reloaded event")

        # a broken configuration: the running one stays
        reloaded = tsa.config.read_text()
        tsa.config.write_text(
            edit_tsu_table(reloaded, "rfc3161", lambda body: body.replace('"pki/tsu.pem"', '"pki/no-such-cert.pem"'))
        )
        tsa.stampd("reload")
        wait_for(lambda: bool(events(tsa, "config.reload_failed")), 5, "config.reload_failed event")
        time.sleep(0.3)
    tsa.config.write_text(reloaded)

    assert status_of(extra_policy()) == "granted"
    exchanges = load.exchanges
    assert len(exchanges) > 20
    failed = [(e.http_status, e.error or status_of(e.reply)) for e in exchanges if not e.granted]
    assert not failed, f"{len(failed)} of {len(exchanges)} requests failed during the reloads: {failed[:3]}"
    assert len(events(tsa, "config.reloaded")) == 1
    ((_, detail),) = events(tsa, "config.reload_failed")
    assert "no-such-cert.pem" in str(detail["error"])


# === HSM keys (OPS-07) ===


def pkcs11_key_table(hsm: SoftHsm, key_label: str) -> Callable[[str], str]:
    """A ``config_edit`` that replaces [tsu.default.key] (the last table `stampd init` writes) with a PKCS#11 key."""

    def edit(text: str) -> str:
        table = (
            "[tsu.default.key]\n"
            'backend = "pkcs11"\n'
            f"module = {json.dumps(str(hsm.module))}\n"
            f'token_label = "{TOKEN_KEYS}"\n'
            f'key_label = "{key_label}"\n'
            'pin_file = "secrets/hsm.pin"\n'
        )
        edited, count = re.subn(r"(?ms)^\[tsu\.default\.key\]\n.*\Z", table, text)
        assert count == 1
        return edited

    return edit


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-3072"])
def test_hsm_backed_tsu_ops07(
    tsa_factory: TsaFactory, softhsm: SoftHsm, openssl: str, tmp_path: Path, key_type: str
) -> None:
    """OPS-07, ALG-01, ALG-03, OPS-08: a TSU key generated in a PKCS#11 token (SoftHSM2) with `stampd tsu keygen`,
    certified from a CSR the token signed, installed with `install-cert`, then used by `stampd serve`: tokens verify
    with OpenSSL and stampd, from concurrent clients; each step is recorded."""
    label = f"tsus-{key_type}-{secrets.token_hex(4)}"
    issued: list[x509.Certificate] = []

    def prepare(tsa: LiveTsa) -> None:
        pin = tsa.dir / "secrets" / "hsm.pin"
        pin.write_text(softhsm.tokens[TOKEN_KEYS] + "\n")
        pin.chmod(0o600)
        tsa.stampd("tsu", "keygen", "default", "--key-type", key_type)
        tsa.stampd("tsu", "csr", "default", "-o", tsa.dir / "req.pem")
        issued.append(issue_tsu_certificate(tsa, tsa.dir / "req.pem", tsa.dir / "hsm-cert.pem"))
        tsa.stampd("tsu", "install-cert", "default", tsa.dir / "hsm-cert.pem")

    tsa = tsa_factory(
        "ec-p256", name=f"tsus-hsm-{key_type}", config_edit=pkcs11_key_table(softhsm, label), before_start=prepare
    )
    (certificate,) = issued
    assert certificate_at(tsa.tsu_pem) == certificate  # install-cert put it at the configured path

    query, digest = make_query()
    reply = tsa.timestamp(query)
    assert_openssl_verifies(tsa, query, reply, tmp_path)
    assert_stampd_verifies(tsa, digest, reply)
    assert signer_serial(reply) == certificate.serial_number
    (signer_info,) = signed_data_of(reply)["signer_infos"]
    algorithm = signer_info["signature_algorithm"]
    if key_type.startswith("rsa"):  # ALG-01: sha256WithRSAEncryption, NULL parameters
        assert algorithm.dump() == bytes.fromhex("300d06092a864886f70d01010b0500")
    else:  # ALG-03: ecdsa-with-SHA256, parameters absent
        assert algorithm.dump() == bytes.fromhex("300a06082a8648ce3d040302")

    # concurrent clients share the token's sessions
    with Load(tsa, ["/"], threads=4) as load:
        time.sleep(0.5)
    assert load.exchanges and all(e.granted for e in load.exchanges)
    for e in load.exchanges[:3]:
        assert_openssl_verifies(tsa, e.query, e.reply, tmp_path)

    info = tsu_list(tsa)["default"]
    assert info["key_backend"] == "pkcs11" and label in str(info["key_location"])
    assert info["state"] == "active"
    assert [d["key_type"] for _, d in events(tsa, "key.generated")] == [key_type]  # OPS-08
    assert len(events(tsa, "key.csr_made")) == 1
    assert [d["serial"] for _, d in events(tsa, "certificate.installed")] == [f"0x{certificate.serial_number:x}"]


# === rollover (OPS-05, CRT-06) ===


NEXT_TABLES = """
[tsu.default.next]
certificate = "pki/tsu-next.pem"
chain = ["pki/issuing-ca.pem"]
activate_at = "{activate_at}"

[tsu.default.next.key]
backend = "file"
path = "pki/tsu-next-key.pem"
passphrase_file = "secrets/tsu-next.pass"
"""

ROLLOVER_LEAD_S = 4
"""How long after the CLI steps (at least) the next key activates: time for `stampd serve` to start and for the old
key to sign some tokens."""


def prepare_next_key(
    activation: list[datetime], *, lead_s: float, tables: str = NEXT_TABLES
) -> Callable[[LiveTsa], None]:
    """A ``before_start`` that adds ``tables`` to stampd.toml, makes the next key with `keygen --next`, has the demo
    CA certify it and installs it with `install-cert --next` (checked at a placeholder activate_at), then sets
    activate_at to ``lead_s`` seconds from now (whole seconds, rounded up) and appends it to ``activation``."""

    def prepare(tsa: LiveTsa) -> None:
        placeholder = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
        base = tsa.config.read_text()
        tsa.config.write_text(base + tables.format(activate_at=placeholder.isoformat()))
        tsa.stampd("tsu", "keygen", "default", "--next")
        tsa.stampd("tsu", "csr", "default", "--next", "-o", tsa.dir / "next.csr")
        issue_tsu_certificate(tsa, tsa.dir / "next.csr", tsa.dir / "next-cert.pem")
        tsa.stampd("tsu", "install-cert", "default", "--next", tsa.dir / "next-cert.pem")
        at = (datetime.now(UTC) + timedelta(seconds=lead_s + 1)).replace(microsecond=0)
        tsa.config.write_text(base + tables.format(activate_at=at.isoformat()))
        activation.append(at)

    return prepare


@dataclass(frozen=True)
class Rollover:
    tsa: LiveTsa
    activate_at: datetime


@pytest.fixture(scope="module")
def rollover(tsa_factory: TsaFactory) -> Rollover:
    """A TSA whose next key activates ROLLOVER_LEAD_S seconds after the CLI steps (before that, the old key signs)."""
    activation: list[datetime] = []
    tsa = tsa_factory(
        "ec-p256", name="tsus-rollover", before_start=prepare_next_key(activation, lead_s=ROLLOVER_LEAD_S)
    )
    (activate_at,) = activation
    return Rollover(tsa, activate_at)


def test_rollover_switches_keys_at_activate_at_ops05_crt06(rollover: Rollover, openssl: str, tmp_path: Path) -> None:
    """OPS-05, CRT-06, OPS-08: a next key made with `keygen --next`, certified, installed with `install-cert --next`
    and activated a few seconds after start: under load, every token dated before activate_at is signed by the old
    certificate and every later one by the new (SignerInfo sid and ESSCertIDv2), both verify against the root, and
    `key.activated` is recorded exactly once."""
    tsa, activate_at = rollover.tsa, rollover.activate_at
    old, new = certificate_at(tsa.tsu_pem), certificate_at(tsa.pki / "tsu-next.pem")
    assert old.serial_number != new.serial_number and old.public_key() != new.public_key()

    with Load(tsa, ["/"], threads=4) as load:
        wait_for(lambda: datetime.now(UTC) > activate_at + timedelta(seconds=1.5), ROLLOVER_LEAD_S + 5, "activation")
    assert all(e.granted for e in load.exchanges)

    by_key: dict[int, list[Exchange]] = {old.serial_number: [], new.serial_number: []}
    for e in load.exchanges:
        gen_time = tst_info(e.reply)["gen_time"].native
        expected = old if gen_time < activate_at else new
        assert signer_serial(e.reply) == expected.serial_number, (gen_time, activate_at)
        cert_hash, issuer_serial = ess_cert_id(e.reply)
        assert cert_hash == hashlib.sha256(expected.public_bytes(serialization.Encoding.DER)).digest()
        assert issuer_serial == expected.serial_number
        by_key[expected.serial_number].append(e)
    assert by_key[old.serial_number] and by_key[new.serial_number], {k: len(v) for k, v in by_key.items()}
    for exchanges in by_key.values():
        for e in (exchanges[0], exchanges[-1]):
            assert_openssl_verifies(tsa, e.query, e.reply, tmp_path)

    assert [d["certificate_serial"] for _, d in events(tsa, "key.activated")] == [f"{new.serial_number:x}"]
    assert [d["next"] for _, d in events(tsa, "key.generated")] == [True]  # OPS-08
    assert [d["next"] for _, d in events(tsa, "certificate.installed")] == [True]


def test_reload_after_rollover_records_one_activation_ops08(rollover: Rollover) -> None:
    """OPS-08: `stampd reload` after the next key took over keeps signing with it, and the records still say that
    the key was activated once."""
    tsa, activate_at = rollover.tsa, rollover.activate_at
    new = certificate_at(tsa.pki / "tsu-next.pem")
    wait_for(lambda: datetime.now(UTC) > activate_at, ROLLOVER_LEAD_S + 5, "activation")
    if signer_serial(tsa.timestamp(make_query()[0])) != new.serial_number:
        pytest.fail("the next key did not take over at activate_at")
    reloads = len(events(tsa, "config.reloaded"))
    tsa.stampd("reload")
    wait_for(lambda: len(events(tsa, "config.reloaded")) > reloads, 5, "config.reloaded event")
    if signer_serial(tsa.timestamp(make_query()[0])) != new.serial_number:
        pytest.fail("after the reload, the old key signs again")
    activations = [d["certificate_serial"] for _, d in events(tsa, "key.activated")]
    assert activations == [f"{new.serial_number:x}"], f"key.activated recorded {len(activations)} times"


def test_next_key_without_chain_uses_the_tsu_chain_ops05(tsa_factory: TsaFactory, openssl: str, tmp_path: Path) -> None:
    """OPS-05: a [tsu.default.next] table without `chain` is accepted by `install-cert --next` (which checks the
    next certificate against the TSU's chain); `stampd serve` must accept it too, and tokens signed by the next key
    carry the TSU's chain and verify."""
    activation: list[datetime] = []
    tables = NEXT_TABLES.replace('chain = ["pki/issuing-ca.pem"]\n', "")
    assert tables != NEXT_TABLES
    tsa = tsa_factory(
        "ec-p256", name="tsus-next-chain", before_start=prepare_next_key(activation, lead_s=0, tables=tables)
    )
    (activate_at,) = activation
    new = certificate_at(tsa.pki / "tsu-next.pem")
    wait_for(lambda: datetime.now(UTC) > activate_at, 5, "activation")
    query, digest = make_query()
    reply = tsa.timestamp(query)
    assert signer_serial(reply) == new.serial_number
    embedded = [c.chosen.dump() for c in signed_data_of(reply)["certificates"]]
    assert certificate_at(tsa.issuing_pem).public_bytes(serialization.Encoding.DER) in embedded
    assert_openssl_verifies(tsa, query, reply, tmp_path)
    assert_stampd_verifies(tsa, digest, reply)


# === termination (OPS-11) ===


def test_terminate_stops_every_tsu_and_destroys_keys_ops11(tsa_factory: TsaFactory, tmp_path: Path) -> None:
    """OPS-11, STS-06: `stampd terminate --archive A --destroy-keys --yes` on a running TSA with two TSUs: at once
    every path answers systemFailure; A is a SQLite copy of the records with the tokens and one tsu.terminated event
    per TSU; the key files are gone and each destruction is recorded."""
    tsa = tsa_factory("ec-p256", name="tsus-terminate", before_start=init_with_tsus("one", "two"))
    serials = set()
    for path in ("/", "/one", "/two"):
        status, _, reply = tsa.post(make_query()[0], path=path)
        assert status == 200
        serials.add(serial_of(reply))
    keys = [tsa.pki / "tsu-key.pem", tsa.pki / "tsu-two-key.pem"]
    assert all(k.exists() for k in keys)

    archive = tmp_path / "archive.sqlite3"
    tsa.stampd("terminate", "--archive", archive, "--destroy-keys", "--yes")
    for path in ("/", "/one", "/two"):
        status, _, reply = tsa.post(make_query()[0], path=path)
        assert status == 200
        assert_system_failure(reply)

    db = sqlite3.connect(f"file:{archive}?mode=ro", uri=True)
    try:
        archived = {int(str(s), 16) for (s,) in db.execute("SELECT serial FROM tokens")}
        terminated = sorted(str(t) for (t,) in db.execute("SELECT tsu FROM events WHERE kind = 'tsu.terminated'"))
    finally:
        db.close()
    assert serials <= archived
    assert terminated == ["one", "two"]

    assert not any(k.exists() for k in keys)
    assert sorted(str(tsu) for tsu, _ in events(tsa, "key.destroyed")) == ["one", "two"]
    assert {name: info["state"] for name, info in tsu_list(tsa).items()} == {"one": "terminated", "two": "terminated"}
    time.sleep(1.2)  # the serving process has read the states by now: still refused, and no traceback
    assert_system_failure(tsa.post(make_query()[0], path="/one")[2])
    assert "Traceback" not in tsa.log_text()
