"""The demo PKI and the TSU certificate profile (SPEC CRT-01..06, ALG-05)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

from stampd.errors import PKIError
from stampd.pki import DemoPki, create_demo_pki
from stampd.signers import KeyType, load_encrypted_key, read_passphrase_file

NOW = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)
ORGANIZATION = "Example Trust Services GmbH"
COUNTRY = "DE"
TSU_NAME = "fra-1"


def make(directory: Path, key_type: KeyType = KeyType.EC_P256, *, rsa_pss: bool = False, **kw: object) -> DemoPki:
    return create_demo_pki(
        directory,
        key_type=key_type,
        rsa_pss=rsa_pss,
        organization=ORGANIZATION,
        country=COUNTRY,
        tsu_name=TSU_NAME,
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return make(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tsu(pki: DemoPki) -> x509.Certificate:
    return load(pki.tsu_certificate)


def test_layout(pki: DemoPki) -> None:
    directory = pki.root_certificate.parent.parent
    assert pki == DemoPki.at(directory)
    assert pki.root_certificate == directory / "pki" / "root.pem"
    assert pki.issuing_ca_certificate == directory / "pki" / "issuing-ca.pem"
    assert pki.tsu_certificate == directory / "pki" / "tsu.pem"
    assert pki.chain == directory / "pki" / "chain.pem"
    assert pki.tsu_key == directory / "pki" / "tsu-key.pem"
    assert pki.ca_passphrase_file == directory / "secrets" / "ca.pass"
    assert pki.tsu_passphrase_file == directory / "secrets" / "tsu.pass"
    assert len(pki.existing()) == 9


def test_secrets_are_private(pki: DemoPki) -> None:
    """Keys and passphrases 0600, their directories 0700."""
    assert mode(pki.tsu_key.parent) == 0o700
    assert mode(pki.ca_passphrase_file.parent) == 0o700
    for path in (pki.root_key, pki.issuing_ca_key, pki.tsu_key, pki.ca_passphrase_file, pki.tsu_passphrase_file):
        assert mode(path) == 0o600, path


def test_keys_are_encrypted_and_match_their_certificates(pki: DemoPki) -> None:
    ca_pass = read_passphrase_file(pki.ca_passphrase_file)
    tsu_pass = read_passphrase_file(pki.tsu_passphrase_file)
    assert ca_pass != tsu_pass
    pairs = [
        (pki.root_key, ca_pass, pki.root_certificate),
        (pki.issuing_ca_key, ca_pass, pki.issuing_ca_certificate),
        (pki.tsu_key, tsu_pass, pki.tsu_certificate),
    ]
    for key_path, passphrase, cert_path in pairs:
        assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert load_encrypted_key(key_path, passphrase).public_key() == load(cert_path).public_key()
    with pytest.raises(PKIError):
        load_encrypted_key(pki.tsu_key, ca_pass)


def test_tsu_eku_is_critical_and_only_time_stamping_crt_01_02(tsu: x509.Certificate) -> None:
    assert [e.oid for e in tsu.extensions].count(ExtensionOID.EXTENDED_KEY_USAGE) == 1
    eku = tsu.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]


def test_tsu_key_usage_is_critical_digital_signature_only_crt_03(tsu: x509.Certificate) -> None:
    ku = tsu.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not any(
        (
            ku.value.content_commitment,
            ku.value.key_encipherment,
            ku.value.data_encipherment,
            ku.value.key_agreement,
            ku.value.key_cert_sign,
            ku.value.crl_sign,
        )
    )


def test_tsu_is_not_a_ca_crt_04(tsu: x509.Certificate) -> None:
    bc = tsu.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False


def test_tsu_subject_has_country_organization_and_unit_crt_05(tsu: x509.Certificate) -> None:
    def only(oid: x509.ObjectIdentifier) -> str:
        (attribute,) = tsu.subject.get_attributes_for_oid(oid)
        return str(attribute.value)

    assert only(NameOID.COUNTRY_NAME) == COUNTRY
    assert only(NameOID.ORGANIZATION_NAME) == ORGANIZATION
    assert only(NameOID.COMMON_NAME) == f"{ORGANIZATION} TSU {TSU_NAME}"


def test_private_key_usage_period_covers_two_years_crt_06(tsu: x509.Certificate) -> None:
    """PKUP present, non-critical, [0]/[1] IMPLICIT GeneralizedTime, inside a 5-year validity."""
    extension = tsu.extensions.get_extension_for_oid(x509.ObjectIdentifier("2.5.29.16"))
    assert not extension.critical
    assert extension.value.public_bytes() == (
        bytes.fromhex("3022800F") + b"20250115120000Z" + bytes.fromhex("810F") + b"20270115120000Z"
    )
    assert tsu.not_valid_before_utc == NOW
    assert tsu.not_valid_after_utc == NOW.replace(year=2030)


def test_ski_and_aki_link_the_chain(pki: DemoPki, tsu: x509.Certificate) -> None:
    root, issuing = load(pki.root_certificate), load(pki.issuing_ca_certificate)

    def ski(cert: x509.Certificate) -> bytes:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    def aki(cert: x509.Certificate) -> bytes | None:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier

    assert aki(tsu) == ski(issuing)
    assert aki(issuing) == ski(root)
    assert ski(tsu) != ski(issuing) != ski(root)


def test_ca_profiles(pki: DemoPki) -> None:
    root, issuing = load(pki.root_certificate), load(pki.issuing_ca_certificate)
    assert root.subject == root.issuer
    assert issuing.issuer == root.subject
    root_bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    issuing_bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_bc.critical and root_bc.value.ca
    assert issuing_bc.critical and issuing_bc.value.ca and issuing_bc.value.path_length == 0
    for cert in (root, issuing):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert root.not_valid_after_utc == NOW.replace(year=2045)
    assert issuing.not_valid_after_utc == NOW.replace(year=2035)


def test_chain_verifies(pki: DemoPki, tsu: x509.Certificate) -> None:
    root, issuing = load(pki.root_certificate), load(pki.issuing_ca_certificate)
    root.verify_directly_issued_by(root)
    issuing.verify_directly_issued_by(root)
    tsu.verify_directly_issued_by(issuing)
    chain = x509.load_pem_x509_certificates(pki.chain.read_bytes())
    assert chain == [issuing, root]


def test_serial_numbers_are_random_and_positive(pki: DemoPki, tsu: x509.Certificate) -> None:
    serials = {load(pki.root_certificate).serial_number, load(pki.issuing_ca_certificate).serial_number}
    serials.add(tsu.serial_number)
    assert len(serials) == 3
    assert all(0 < s < 2**159 and s.bit_length() > 64 for s in serials)


def openssl_verify_timestamp_purpose(pki: DemoPki, at: datetime) -> subprocess.CompletedProcess[str]:
    """`openssl verify -purpose timestampsign` at a fixed time, so the result never depends on the wall clock."""
    command = ["openssl", "verify", "-purpose", "timestampsign", "-attime", str(int(at.timestamp()))]
    command += ["-CAfile", str(pki.root_certificate), "-untrusted", str(pki.issuing_ca_certificate)]
    return subprocess.run([*command, str(pki.tsu_certificate)], capture_output=True, text=True, check=False)


requires_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")


@requires_openssl
@pytest.mark.parametrize(
    ("key_type", "rsa_pss", "signature_oid"),
    [
        (KeyType.EC_P256, False, SignatureAlgorithmOID.ECDSA_WITH_SHA256),
        (KeyType.EC_P384, False, SignatureAlgorithmOID.ECDSA_WITH_SHA384),
        (KeyType.ED25519, False, SignatureAlgorithmOID.ED25519),
        (KeyType.RSA_2048, False, SignatureAlgorithmOID.RSA_WITH_SHA256),
        (KeyType.RSA_2048, True, SignatureAlgorithmOID.RSASSA_PSS),
    ],
)
def test_openssl_accepts_the_tsu_certificate_for_time_stamping_crt_01_03_alg_05(
    key_type: KeyType, rsa_pss: bool, signature_oid: x509.ObjectIdentifier, tmp_path: Path
) -> None:
    """OpenSSL's timestampsign purpose checks EKU (only, critical) and KU; certificates use the TSU's hash."""
    pki = make(tmp_path, key_type, rsa_pss=rsa_pss)
    result = openssl_verify_timestamp_purpose(pki, NOW + timedelta(days=1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
    for path in (pki.root_certificate, pki.issuing_ca_certificate, pki.tsu_certificate):
        assert load(path).signature_algorithm_oid == signature_oid


@requires_openssl
def test_openssl_rejects_the_tsu_certificate_after_its_validity(pki: DemoPki) -> None:
    """A control for the test above: the check is real, not a command that always succeeds."""
    result = openssl_verify_timestamp_purpose(pki, NOW.replace(year=2031))
    assert result.returncode != 0


def test_ec_p384_uses_p384_everywhere(tmp_path: Path) -> None:
    pki = make(tmp_path, KeyType.EC_P384)
    for path in (pki.root_certificate, pki.issuing_ca_certificate, pki.tsu_certificate):
        public_key = load(path).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp384r1"


def test_refuses_to_overwrite_unless_replace(tmp_path: Path) -> None:
    first = make(tmp_path)
    before = first.tsu_certificate.read_bytes()
    with pytest.raises(PKIError, match="already exists"):
        make(tmp_path)
    assert first.tsu_certificate.read_bytes() == before

    second = make(tmp_path, replace=True)
    assert second.tsu_certificate.read_bytes() != before
    assert mode(second.tsu_key) == 0o600
    new_key = load_encrypted_key(second.tsu_key, read_passphrase_file(second.tsu_passphrase_file))
    assert new_key.public_key() == load(second.tsu_certificate).public_key()


def test_replace_tightens_an_existing_secrets_directory(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir(mode=0o755)
    (tmp_path / "secrets").chmod(0o755)
    pki = make(tmp_path)
    assert mode(pki.ca_passphrase_file.parent) == 0o700


def test_rsa_pss_with_ec_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="RSA"):
        make(tmp_path, KeyType.EC_P256, rsa_pss=True)
    assert not (tmp_path / "pki").exists()


def test_naive_time_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="timezone"):
        create_demo_pki(
            tmp_path,
            key_type=KeyType.EC_P256,
            rsa_pss=False,
            organization=ORGANIZATION,
            country=COUNTRY,
            tsu_name=TSU_NAME,
            now=datetime(2025, 1, 1),
        )


def test_leap_day_start(tmp_path: Path) -> None:
    leap = datetime(2024, 2, 29, 8, 30, 15, 123456, tzinfo=UTC)
    pki = create_demo_pki(
        tmp_path,
        key_type=KeyType.ED25519,
        rsa_pss=False,
        organization=ORGANIZATION,
        country=COUNTRY,
        tsu_name=TSU_NAME,
        now=leap,
    )
    tsu = load(pki.tsu_certificate)
    assert tsu.not_valid_before_utc == leap.replace(microsecond=0)
    assert tsu.not_valid_after_utc == datetime(2029, 2, 28, 8, 30, 15, tzinfo=UTC)
    pkup = tsu.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value
    assert pkup.not_after == datetime(2026, 2, 28, 8, 30, 15)


def test_invalid_country_is_pki_error(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="subject"):
        create_demo_pki(
            tmp_path,
            key_type=KeyType.ED25519,
            rsa_pss=False,
            organization=ORGANIZATION,
            country="DEU",
            tsu_name=TSU_NAME,
            now=NOW,
        )
