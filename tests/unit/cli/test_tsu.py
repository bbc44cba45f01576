"""`stampd tsu`: list, keygen, csr and install-cert on a demo installation (SPEC CRT-01..07, OPS-05..08)."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stampd.app import load_tsu
from stampd.cli import main as cli_main
from stampd.config import load_config
from stampd.errors import ConfigError, PKIError, StampdError
from stampd.records.store import RecordStore
from stampd.signers import PrivateKey, load_encrypted_key, read_passphrase_file
from stampd.signers.pkcs11 import destroy_key

sys.path.insert(0, str(Path(__file__).parents[2]))
from hsm import TOKEN_SCRATCH, SoftHsm, softhsm

__all__ = ["softhsm"]  # the session fixture, re-exported so pytest finds it here

SUBJECT = "CN=Example TSA Ltd TSU lon-1,O=Example TSA Ltd,C=GB"

NEXT_TABLE = """
[tsu.default.next]
certificate = "pki/tsu-next.pem"
activate_at = "{activate_at}"

[tsu.default.next.key]
backend = "file"
path = "pki/tsu-next-key.pem"
passphrase_file = "secrets/tsu-next.pass"
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, ["tsu", *args])


def ok(*args: str) -> Result:
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def refused(*args: str, kind: type[StampdError] = PKIError) -> str:
    """The message of the StampdError the command stopped with (main() prints it and exits 2)."""
    result = run(*args)
    assert isinstance(result.exception, kind), (result.output, result.exception)
    return str(result.exception)


@pytest.fixture
def tsa(tmp_path: Path) -> Path:
    directory = tmp_path / "tsa"
    result = CliRunner().invoke(
        cli_main.cli,
        ["init", str(directory), "--organization", "Example TSA Ltd", "--country", "GB", "--name", "lon-1"],
    )
    assert result.exit_code == 0, result.output
    return directory


def conf(directory: Path) -> str:
    return str(directory / "stampd.toml")


def events(directory: Path, kind: str | None = None) -> list[dict[str, Any]]:
    store = RecordStore(load_config(directory / "stampd.toml").records.url)
    try:
        return [e for e in store.events() if kind is None or e["kind"] == kind]
    finally:
        store.close()


def add_next_table(directory: Path, activate_at: datetime) -> None:
    with (directory / "stampd.toml").open("a", encoding="utf-8") as f:
        f.write(NEXT_TABLE.format(activate_at=activate_at.strftime("%Y-%m-%dT%H:%M:%SZ")))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def tsu_key(directory: Path) -> PrivateKey:
    return load_encrypted_key(directory / "pki/tsu-key.pem", read_passphrase_file(directory / "secrets/tsu.pass"))


def issuing_ca(directory: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The demo issuing CA and its key (pki/issuing-ca-key.pem, passphrase in secrets/ca.pass)."""
    key = load_encrypted_key(directory / "pki/issuing-ca-key.pem", read_passphrase_file(directory / "secrets/ca.pass"))
    return load_cert(directory / "pki/issuing-ca.pem"), key


def other_root() -> tuple[x509.Certificate, PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Somebody Else's Root")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    directory: Path,
    public_key: Any,
    *,
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.TIME_STAMPING,),
    eku_critical: bool = True,
    ca: bool = False,
    key_cert_sign: bool = False,
    start: datetime | None = None,
    end: datetime | None = None,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """A TSU certificate from the demo issuing CA (or ``issuer``), in the stampd profile unless told otherwise."""
    issuer_cert, issuer_key = issuer or issuing_ca(directory)
    now = datetime.now(UTC).replace(microsecond=0)
    start = start or now - timedelta(hours=1)
    end = end or now + timedelta(days=365)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or load_cert(directory / "pki/tsu.pem").subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage(key_cert_sign=key_cert_sign), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=eku_critical)
        .add_extension(x509.PrivateKeyUsagePeriod(not_before=start, not_after=end - timedelta(days=30)), critical=False)
    )
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def sha256_fingerprint(public_key: Any) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


# --- list ---


def test_list_json_describes_the_tsu_ops_05(tsa: Path) -> None:
    """Fresh installation (no records database yet): every field, state active, no key opened."""
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json").stdout)
    cert = load_cert(tsa / "pki/tsu.pem")
    period = cert.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value
    assert info["name"] == "default"
    assert info["path"] == "/"
    assert info["key_backend"] == "file"
    assert info["key_location"] == str(tsa / "pki/tsu-key.pem")
    assert info["qualified"] is False
    assert info["subject"] == SUBJECT
    assert info["serial"] == f"0x{cert.serial_number:x}"
    assert info["not_after"] == cert.not_valid_after_utc.isoformat()
    assert period.not_after is not None
    assert info["private_key_usage_period"]["not_after"] == period.not_after.replace(tzinfo=UTC).isoformat()
    assert info["signing_window_end"] == info["private_key_usage_period"]["not_after"]  # CRT-06
    assert 729 <= info["days_left"] <= 731
    assert info["next"] is None
    assert info["state"] == "active"
    assert info["problems"] == []


def test_list_text(tsa: Path) -> None:
    out = ok("list", "-c", conf(tsa)).stdout
    assert out.startswith("default: active\n")
    assert SUBJECT in out
    assert "key usage period:" in out
    assert "next key:         none" in out
    assert read_passphrase_file(tsa / "secrets/tsu.pass").decode() not in out


def test_list_states_over_time_crt_06_ops_05(tsa: Path) -> None:
    """Outside the signing window (certificate validity narrowed by privateKeyUsagePeriod) the TSU is expired;
    within renew_before (30 days by default) of its end, renew soon."""
    cert = load_cert(tsa / "pki/tsu.pem")
    period_end = cert.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value.not_after
    assert period_end is not None
    window_end = period_end.replace(tzinfo=UTC)

    def state_at(moment: datetime) -> dict[str, Any]:
        infos: list[dict[str, Any]] = json.loads(
            ok("list", "-c", conf(tsa), "--json", "--at", moment.isoformat()).stdout
        )
        return infos[0]

    assert state_at(cert.not_valid_before_utc - timedelta(days=1))["state"] == "not yet valid"
    assert state_at(window_end - timedelta(days=31))["state"] == "active"
    soon = state_at(window_end - timedelta(days=10, hours=1))
    assert (soon["state"], soon["days_left"]) == ("renew soon", 10)
    expired = state_at(window_end + timedelta(seconds=1))  # the certificate itself is still valid: PKUP ended
    assert (expired["state"], expired["days_left"]) == ("expired", 0)
    assert "renew soon" in ok("list", "-c", conf(tsa), "--at", (window_end - timedelta(days=1)).isoformat()).stdout


def test_list_renew_soon_is_quiet_once_the_next_certificate_is_installed(tsa: Path) -> None:
    cert = load_cert(tsa / "pki/tsu.pem")
    period_end = cert.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value.not_after
    assert period_end is not None
    window_end = period_end.replace(tzinfo=UTC)
    add_next_table(tsa, window_end - timedelta(days=1))
    at = (window_end - timedelta(days=5)).isoformat()
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json", "--at", at).stdout)
    assert info["state"] == "renew soon"
    assert info["next"]["certificate_installed"] is False
    write_pem(tsa / "pki/tsu-next.pem", cert)  # any readable certificate counts as installed for list
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json", "--at", at).stdout)
    assert info["state"] == "active"
    assert info["next"]["activate_at"] == (window_end - timedelta(days=1)).replace(microsecond=0).isoformat()


def test_list_shows_compromised_ops_08(tsa: Path) -> None:
    store = RecordStore(load_config(tsa / "stampd.toml").records.url)
    store.stop_tsu("default", "compromised", since_us=1_700_000_000_000_000, reason="key leaked", detail={})
    store.close()
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json").stdout)
    assert info["state"] == "compromised"
    assert info["state_reason"] == "key leaked"
    assert info["state_since"] == "2023-11-14T22:13:20+00:00"
    assert ok("list", "-c", conf(tsa)).stdout.startswith("default: compromised\n")


def test_list_does_not_need_the_key(tsa: Path) -> None:
    """A missing key or passphrase is shown as a problem; list never opens the key."""
    (tsa / "pki/tsu-key.pem").unlink()
    (tsa / "secrets/tsu.pass").unlink()
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json").stdout)
    assert info["state"] == "active"
    assert any("tsu-key.pem not found" in p for p in info["problems"])
    assert any("tsu.pass not found" in p for p in info["problems"])
    (tsa / "pki/tsu.pem").write_text("garbage")
    out = ok("list", "-c", conf(tsa)).stdout
    assert out.startswith("default: problem\n")
    assert "holds no readable certificate" in out


# --- keygen ---


def test_keygen_refuses_an_existing_key_ops_07(tsa: Path) -> None:
    before = (tsa / "pki/tsu-key.pem").read_bytes()
    assert "already exists" in refused("keygen", "default", "-c", conf(tsa))
    assert (tsa / "pki/tsu-key.pem").read_bytes() == before
    assert events(tsa, "key.generated") == []


def test_keygen_next_makes_a_key_and_records_it_ops_08(tsa: Path) -> None:
    add_next_table(tsa, datetime.now(UTC) + timedelta(days=30))
    out = ok("keygen", "default", "--next", "-c", conf(tsa)).stdout
    key_path, pass_path = tsa / "pki/tsu-next-key.pem", tsa / "secrets/tsu-next.pass"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pass_path.stat().st_mode) == 0o600
    passphrase = read_passphrase_file(pass_path)
    key = load_encrypted_key(key_path, passphrase)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"  # like the current key
    fingerprint = sha256_fingerprint(key.public_key())
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in out
    assert passphrase.decode() not in out
    (event,) = events(tsa, "key.generated")
    assert event["tsu"] == "default"
    assert event["detail"] == {
        "backend": "file",
        "location": str(key_path),
        "key_type": "ec-p256",
        "next": True,
        "public_key_sha256": fingerprint,
    }
    assert "already exists" in refused("keygen", "default", "--next", "-c", conf(tsa))
    assert len(events(tsa, "key.generated")) == 1


def test_keygen_refuses_a_key_type_the_tsu_cannot_sign_with(tsa: Path) -> None:
    (tsa / "pki/tsu-key.pem").rename(tsa / "pki/old-key.pem")
    assert "sha512" in refused("keygen", "default", "--key-type", "ed25519", "-c", conf(tsa), kind=ConfigError)
    assert "sha384" in refused("keygen", "default", "--key-type", "ec-p384", "-c", conf(tsa), kind=ConfigError)
    assert not (tsa / "pki/tsu-key.pem").exists()
    ok("keygen", "default", "--key-type", "rsa-2048", "-c", conf(tsa))
    key = load_encrypted_key(tsa / "pki/tsu-key.pem", read_passphrase_file(tsa / "secrets/tsu.pass"))
    assert key.public_key().key_size == 2048  # type: ignore[union-attr]


def test_keygen_next_needs_a_next_table(tsa: Path) -> None:
    assert "[tsu.default.next]" in refused("keygen", "default", "--next", "-c", conf(tsa), kind=ConfigError)
    assert "no [tsu.other]" in refused("keygen", "other", "-c", conf(tsa), kind=ConfigError)


# --- csr ---


def test_csr_is_signed_by_the_tsu_key_with_the_profile_crt_01_03_05(tsa: Path) -> None:
    pem = ok("csr", "default", "-c", conf(tsa)).stdout.encode()
    request = x509.load_pem_x509_csr(pem)
    assert request.is_signature_valid
    assert request.public_key() == tsu_key(tsa).public_key()
    assert request.subject.rfc4514_string() == SUBJECT  # from the current certificate
    eku = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    ku = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value == key_usage()
    (event,) = events(tsa, "key.csr_made")
    assert event["tsu"] == "default"
    assert event["detail"]["subject"] == SUBJECT
    assert event["detail"]["public_key_sha256"] == sha256_fingerprint(request.public_key())


def test_csr_subject_options_and_output_file(tsa: Path) -> None:
    out = tsa / "req.pem"
    result = ok(
        "csr", "default", "-c", conf(tsa), "-o", str(out), "--country", "de", "--organization", "Beispiel GmbH",
        "--common-name", "Beispiel TSU 7",
    )  # fmt: skip
    assert result.stdout == ""
    request = x509.load_pem_x509_csr(out.read_bytes())
    assert request.is_signature_valid
    assert request.subject.rfc4514_string() == "CN=Beispiel TSU 7,O=Beispiel GmbH,C=DE"
    assert run("csr", "default", "-c", conf(tsa), "--country", "DEU").exit_code == 2


@pytest.mark.parametrize("init_args", [["--key-type", "ed25519"], ["--key-type", "rsa-2048", "--rsa-pss"]])
def test_csr_for_other_key_types_alg_02_04(tmp_path: Path, init_args: list[str]) -> None:
    result = CliRunner().invoke(cli_main.cli, ["init", str(tmp_path), *init_args])
    assert result.exit_code == 0, result.output
    request = x509.load_pem_x509_csr(ok("csr", "default", "-c", conf(tmp_path)).stdout.encode())
    assert request.is_signature_valid


def test_csr_next_without_certificate_needs_the_subject(tsa: Path) -> None:
    add_next_table(tsa, datetime.now(UTC) + timedelta(days=30))
    ok("keygen", "default", "--next", "-c", conf(tsa))
    request = x509.load_pem_x509_csr(ok("csr", "default", "--next", "-c", conf(tsa)).stdout.encode())
    next_key = load_encrypted_key(tsa / "pki/tsu-next-key.pem", read_passphrase_file(tsa / "secrets/tsu-next.pass"))
    assert request.public_key() == next_key.public_key()
    assert request.subject.rfc4514_string() == SUBJECT  # the current certificate names the TSU
    (tsa / "pki/tsu.pem").unlink()
    assert "--organization" in refused("csr", "default", "--next", "-c", conf(tsa), kind=ConfigError)
    request = x509.load_pem_x509_csr(
        ok(
            "csr", "default", "--next", "-c", conf(tsa), "--country", "GB", "--organization", "Example TSA Ltd"
        ).stdout.encode()
    )
    assert request.subject.rfc4514_string() == "CN=Example TSA Ltd TSU default,O=Example TSA Ltd,C=GB"


# --- install-cert ---


def test_install_cert_for_a_new_key_passes_the_start_up_checks_crt_07_ops_06(tsa: Path) -> None:
    """Rotate: new key, CSR, certificate from the demo CA, install; the server's start-up accepts it."""
    old_cert = (tsa / "pki/tsu.pem").read_bytes()
    old_chain = (tsa / "pki/issuing-ca.pem").read_bytes()
    (tsa / "pki/tsu-key.pem").rename(tsa / "pki/tsu-key-old.pem")
    ok("keygen", "default", "-c", conf(tsa))
    request = x509.load_pem_x509_csr(ok("csr", "default", "-c", conf(tsa)).stdout.encode())
    certificate = issue(tsa, request.public_key(), subject=request.subject)
    cert_file = write_pem(tsa / "new.pem", certificate)
    chain_file = write_pem(tsa / "new-chain.pem", issuing_ca(tsa)[0])

    out = ok("install-cert", "default", str(cert_file), "--chain", str(chain_file), "-c", conf(tsa)).stdout
    assert "stampd reload" in out and "SIGHUP" in out
    assert load_cert(tsa / "pki/tsu.pem") == certificate
    (backup,) = (tsa / "pki").glob("tsu.pem.replaced-*")
    assert backup.read_bytes() == old_cert
    (chain_backup,) = (tsa / "pki").glob("issuing-ca.pem.replaced-*")
    assert chain_backup.read_bytes() == old_chain
    assert not list((tsa / "pki").glob(".*.tmp"))

    config = load_config(tsa / "stampd.toml")
    loaded = load_tsu(config.tsus[0], datetime.now(UTC))
    assert loaded.certificate == certificate

    (event,) = events(tsa, "certificate.installed")
    detail = event["detail"]
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert event["tsu"] == "default"
    assert detail["sha256"] == hashlib.sha256(der).hexdigest()
    assert detail["serial"] == f"0x{certificate.serial_number:x}"
    assert detail["subject"] == SUBJECT
    assert detail["not_after"] == certificate.not_valid_after_utc.isoformat()
    assert detail["private_key_usage_period"]["not_after"] is not None
    assert detail["previous"] == str(backup)
    kinds = [e["kind"] for e in events(tsa) if e["kind"].startswith(("key.", "certificate."))]
    assert kinds == ["key.generated", "key.csr_made", "certificate.installed"]  # OPS-08: the whole rotation


def test_install_cert_next_is_checked_at_activation(tsa: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    add_next_table(tsa, now + timedelta(days=20))
    ok("keygen", "default", "--next", "-c", conf(tsa))
    request = x509.load_pem_x509_csr(ok("csr", "default", "--next", "-c", conf(tsa)).stdout.encode())
    too_early = issue(tsa, request.public_key(), start=now, end=now + timedelta(days=40))  # PKUP ends at day 10
    message = refused("install-cert", "default", str(write_pem(tsa / "a.pem", too_early)), "--next", "-c", conf(tsa))
    assert "CRT-06" in message and "privateKeyUsagePeriod" in message
    later = issue(tsa, request.public_key(), start=now + timedelta(days=19), end=now + timedelta(days=400))
    before = (tsa / "pki/tsu.pem").read_bytes()
    ok("install-cert", "default", str(write_pem(tsa / "b.pem", later)), "--next", "-c", conf(tsa))
    assert load_cert(tsa / "pki/tsu-next.pem") == later
    assert (tsa / "pki/tsu.pem").read_bytes() == before  # the current certificate is untouched
    (event,) = events(tsa, "certificate.installed")
    assert event["detail"]["next"] is True
    assert event["detail"]["previous"] is None


def _wrong_key(directory: Path) -> x509.Certificate:
    return issue(directory, ec.generate_private_key(ec.SECP256R1()).public_key())


def _current(directory: Path, **kwargs: Any) -> x509.Certificate:
    return issue(directory, tsu_key(directory).public_key(), **kwargs)


REFUSALS = {
    "wrong key (CRT-07)": (_wrong_key, "not the TSU key"),
    "extra EKU (CRT-01)": (
        lambda d: _current(d, eku=[ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CODE_SIGNING]),
        "more than timeStamping: 1.3.6.1.5.5.7.3.3",
    ),
    "non-critical EKU (CRT-01)": (lambda d: _current(d, eku_critical=False), "extendedKeyUsage is not critical"),
    "no timeStamping EKU (CRT-01)": (
        lambda d: _current(d, eku=[ExtendedKeyUsageOID.CODE_SIGNING]),
        "lacks id-kp-timeStamping",
    ),
    "CA certificate (CRT-04)": (lambda d: _current(d, ca=True), "CRT-04: the certificate is a CA certificate"),
    "keyCertSign (CRT-03)": (lambda d: _current(d, key_cert_sign=True), "keyUsage also allows keyCertSign"),
    "expired (CRT-06, OPS-05)": (
        lambda d: _current(d, start=datetime.now(UTC) - timedelta(days=400), end=datetime.now(UTC) - timedelta(days=1)),
        "CRT-06: certificate valid",
    ),
    "chain to another root (OPS-06)": (
        lambda d: _current(d, issuer=other_root()),
        "no valid chain to the trust anchor",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_install_cert_refusals_name_their_reason(tsa: Path, case: str) -> None:
    make, reason = REFUSALS[case]
    before = (tsa / "pki/tsu.pem").read_bytes()
    cert_file = write_pem(tsa / "candidate.pem", make(tsa))
    message = refused("install-cert", "default", str(cert_file), "-c", conf(tsa))
    assert "refused" in message and reason in message, message
    assert (tsa / "pki/tsu.pem").read_bytes() == before
    assert not list((tsa / "pki").glob("tsu.pem.replaced-*"))
    assert events(tsa, "certificate.installed") == []


def test_install_cert_refusal_exits_2(
    tsa: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cert_file = write_pem(tsa / "candidate.pem", _wrong_key(tsa))
    monkeypatch.setattr(sys, "argv", ["stampd", "tsu", "install-cert", "default", str(cert_file), "-c", conf(tsa)])
    with pytest.raises(SystemExit) as excinfo:
        cli_main.main()
    assert excinfo.value.code == 2
    assert "not the TSU key" in capsys.readouterr().err


def test_install_cert_refuses_a_bundle_and_a_chain_without_a_place(tsa: Path) -> None:
    certificate = _current(tsa)
    bundle = write_pem(tsa / "bundle.pem", certificate, issuing_ca(tsa)[0])
    assert "--chain" in refused("install-cert", "default", str(bundle), "-c", conf(tsa))
    add_next_table(tsa, datetime.now(UTC) + timedelta(hours=1))
    single = write_pem(tsa / "single.pem", certificate)
    message = refused(
        "install-cert", "default", str(single), "--next", "--chain", str(tsa / "pki/chain.pem"), "-c", conf(tsa),
        kind=ConfigError,
    )  # fmt: skip
    assert "tsu.default.next.chain" in message


def test_tsu_group_is_registered() -> None:
    assert {"list", "keygen", "csr", "install-cert"} <= set(cli_main.cli.commands["tsu"].commands)  # type: ignore[attr-defined]


# --- PKCS#11 (SoftHSM2): the key never leaves the token (SPEC OPS-07) ---


@pytest.fixture
def hsm_tsa(tsa: Path, softhsm: SoftHsm) -> Iterator[tuple[Path, str]]:
    """The demo installation with its key table pointing at a fresh label in SoftHSM2; the key is destroyed after."""
    label = f"tsu-cli-{uuid.uuid4().hex[:12]}"
    pin_file = tsa / "secrets/hsm.pin"
    pin_file.write_bytes(softhsm.pin(TOKEN_SCRATCH) + b"\n")
    config = tsa / "stampd.toml"
    key_table = (
        "[tsu.default.key]\n"
        'backend = "pkcs11"\n'
        f'module = "{softhsm.module}"\n'
        f'token_label = "{TOKEN_SCRATCH}"\n'
        f'key_label = "{label}"\n'
        'pin_file = "secrets/hsm.pin"\n'
    )
    text, count = re.subn(r"\[tsu\.default\.key\]\n[^\[]*", lambda _: key_table, config.read_text())
    assert count == 1
    config.write_text(text)
    yield tsa, label
    destroy_key(module=softhsm.module, token_label=TOKEN_SCRATCH, key_label=label, pin=softhsm.pin(TOKEN_SCRATCH))


def test_hsm_keygen_csr_install_ops_07(hsm_tsa: tuple[Path, str], softhsm: SoftHsm) -> None:
    """The whole rotation with the key in the token: the CSR and the start-up self-check sign through PKCS#11."""
    tsa, label = hsm_tsa
    (info,) = json.loads(ok("list", "-c", conf(tsa), "--json").stdout)
    assert info["key_location"] == f"pkcs11:token={TOKEN_SCRATCH};object={label}"
    out = ok("keygen", "default", "-c", conf(tsa)).stdout
    (event,) = events(tsa, "key.generated")
    assert event["detail"]["backend"] == "pkcs11"
    assert event["detail"]["location"] == info["key_location"]
    fingerprint = event["detail"]["public_key_sha256"]
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in out
    assert softhsm.tokens[TOKEN_SCRATCH] not in out
    assert "refusing" in refused("keygen", "default", "-c", conf(tsa))

    request = x509.load_pem_x509_csr(ok("csr", "default", "-c", conf(tsa)).stdout.encode())
    assert request.is_signature_valid
    assert sha256_fingerprint(request.public_key()) == fingerprint
    assert request.subject.rfc4514_string() == SUBJECT

    assert "not the TSU key" in refused(
        "install-cert", "default", str(write_pem(tsa / "old.pem", load_cert(tsa / "pki/tsu.pem"))), "-c", conf(tsa)
    )
    certificate = issue(tsa, request.public_key(), subject=request.subject)
    ok("install-cert", "default", str(write_pem(tsa / "new.pem", certificate)), "-c", conf(tsa))
    loaded = load_tsu(load_config(tsa / "stampd.toml").tsus[0], datetime.now(UTC))
    try:
        assert loaded.certificate == certificate
    finally:
        loaded.signer.close()
