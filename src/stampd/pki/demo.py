"""A closed-community PKI for a first deployment or a test: root CA, issuing CA and one TSU certificate.

The TSU certificate follows the profile that verifiers enforce (SPEC CRT-01..06): critical EKU holding only
id-kp-timeStamping, critical keyUsage digitalSignature, not a CA, C/O/CN subject, and a privateKeyUsagePeriod
shorter than the validity, so tokens stay verifiable for years after the key stops signing.

Certificate signatures use the same key type as the TSU: ECDSA with the curve's hash, Ed25519, or RSA with
SHA-256 and PKCS#1 v1.5, or RSASSA-PSS when the TSU signs with PSS, so that a deployment that asked for PSS
does not depend on PKCS#1 v1.5 anywhere in its chain.
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stampd.errors import PKIError
from stampd.signers.keyfile import (
    SECRET_DIR_MODE,
    KeyType,
    PrivateKey,
    default_signature_hash,
    generate_private_key,
    load_encrypted_key,
    new_passphrase,
    read_passphrase_file,
    write_encrypted_key,
    write_new_file,
    write_passphrase_file,
)

ROOT_YEARS = 20
ISSUING_CA_YEARS = 10
TSU_YEARS = 5
TSU_KEY_USAGE_YEARS = 2
"""The TSU key signs for 2 years; its certificate stays valid 3 years longer so that tokens can be verified."""

_CERT_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384]] = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}


@dataclass(frozen=True, slots=True)
class DemoPki:
    """Where `create_demo_pki` put each file."""

    root_certificate: Path
    issuing_ca_certificate: Path
    tsu_certificate: Path
    chain: Path
    root_key: Path
    issuing_ca_key: Path
    tsu_key: Path
    ca_passphrase_file: Path
    tsu_passphrase_file: Path

    @classmethod
    def at(cls, directory: Path) -> DemoPki:
        """The layout under ``directory`` (``pki/`` for certificates and keys, ``secrets/`` for passphrases)."""
        pki = directory / "pki"
        secrets = directory / "secrets"
        return cls(
            root_certificate=pki / "root.pem",
            issuing_ca_certificate=pki / "issuing-ca.pem",
            tsu_certificate=pki / "tsu.pem",
            chain=pki / "chain.pem",
            root_key=pki / "root-key.pem",
            issuing_ca_key=pki / "issuing-ca-key.pem",
            tsu_key=pki / "tsu-key.pem",
            ca_passphrase_file=secrets / "ca.pass",
            tsu_passphrase_file=secrets / "tsu.pass",
        )

    def existing(self) -> list[Path]:
        """The files of this layout that already exist."""
        return [p for p in astuple(self) if p.exists()]


def create_demo_pki(
    directory: Path,
    *,
    key_type: KeyType,
    rsa_pss: bool,
    organization: str,
    country: str,
    tsu_name: str,
    now: datetime,
    replace: bool = False,
) -> DemoPki:
    """Generate the three keys and certificates and write them under ``directory``.

    Everything is built in memory first, so a bad argument leaves no half-written PKI. Existing files are
    refused unless ``replace``. ``now`` (timezone-aware) starts every validity window, so tests are
    deterministic.
    """
    if rsa_pss and not key_type.is_rsa:
        raise PKIError(f"RSA-PSS needs an RSA key type, not {key_type}")
    if now.tzinfo is None:
        raise PKIError("the PKI start time must be timezone-aware")
    start = now.astimezone(UTC).replace(microsecond=0)
    layout = DemoPki.at(directory)
    if not replace and (existing := layout.existing()):
        raise PKIError(f"{existing[0]} already exists; refusing to overwrite the PKI")

    root_key = generate_private_key(key_type)
    issuing_key = generate_private_key(key_type)
    tsu_key = generate_private_key(key_type)
    try:
        root_name = _name(country, organization, f"{organization} Root CA")
        issuing_name = _name(country, organization, f"{organization} Issuing CA")
        tsu_subject = _name(country, organization, f"{organization} TSU {tsu_name}")
    except ValueError as e:
        raise PKIError(f"invalid subject name: {e}") from e

    root = _sign(
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(_add_years(start, ROOT_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False),
        root_key,
        rsa_pss,
    )
    issuing = _sign(
        _issued_by(root, issuing_name, issuing_key, start, ISSUING_CA_YEARS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True),
        root_key,
        rsa_pss,
    )
    tsu = _tsu_certificate(issuing, issuing_key, subject=tsu_subject, tsu_key=tsu_key, start=start, rsa_pss=rsa_pss)

    _make_private_dir(layout.root_key.parent)
    _make_private_dir(layout.ca_passphrase_file.parent)
    ca_passphrase = new_passphrase()
    tsu_passphrase = new_passphrase()
    write_passphrase_file(layout.ca_passphrase_file, ca_passphrase, overwrite=replace)
    write_passphrase_file(layout.tsu_passphrase_file, tsu_passphrase, overwrite=replace)
    write_encrypted_key(layout.root_key, root_key, ca_passphrase, overwrite=replace)
    write_encrypted_key(layout.issuing_ca_key, issuing_key, ca_passphrase, overwrite=replace)
    write_encrypted_key(layout.tsu_key, tsu_key, tsu_passphrase, overwrite=replace)
    write_new_file(layout.root_certificate, _pem(root), overwrite=replace)
    write_new_file(layout.issuing_ca_certificate, _pem(issuing), overwrite=replace)
    write_new_file(layout.tsu_certificate, _pem(tsu), overwrite=replace)
    write_new_file(layout.chain, _pem(issuing) + _pem(root), overwrite=replace)
    return layout


def _tsu_certificate(
    issuing: x509.Certificate,
    issuing_key: PrivateKey,
    *,
    subject: x509.Name,
    tsu_key: PrivateKey,
    start: datetime,
    rsa_pss: bool,
) -> x509.Certificate:
    """The TSU profile (SPEC CRT-01..06): critical EKU timeStamping only, critical keyUsage digitalSignature only,
    not a CA, and a privateKeyUsagePeriod inside the validity."""
    return _sign(
        _issued_by(issuing, subject, tsu_key, start, TSU_YEARS)
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
        .add_extension(
            x509.PrivateKeyUsagePeriod(not_before=start, not_after=_add_years(start, TSU_KEY_USAGE_YEARS)),
            critical=False,
        ),
        issuing_key,
        rsa_pss,
    )


@dataclass(frozen=True, slots=True)
class TsuFiles:
    certificate: Path
    key: Path
    passphrase_file: Path


def add_demo_tsu(
    directory: Path,
    *,
    name: str,
    key_type: KeyType,
    rsa_pss: bool,
    organization: str,
    country: str,
    now: datetime,
    replace: bool = False,
) -> TsuFiles:
    """One more TSU under the demo issuing CA: its own key (and passphrase) and certificate, named ``name``."""
    layout = DemoPki.at(directory)
    issuing = x509.load_pem_x509_certificate(layout.issuing_ca_certificate.read_bytes())
    issuing_key = load_encrypted_key(layout.issuing_ca_key, read_passphrase_file(layout.ca_passphrase_file))
    files = TsuFiles(
        directory / "pki" / f"tsu-{name}.pem",
        directory / "pki" / f"tsu-{name}-key.pem",
        directory / "secrets" / f"tsu-{name}.pass",
    )
    try:
        subject = _name(country, organization, f"{organization} TSU {name}")
    except ValueError as e:
        raise PKIError(f"invalid subject name: {e}") from e
    tsu_key = generate_private_key(key_type)
    start = now.astimezone(UTC).replace(microsecond=0)
    tsu = _tsu_certificate(issuing, issuing_key, subject=subject, tsu_key=tsu_key, start=start, rsa_pss=rsa_pss)
    passphrase = new_passphrase()
    write_passphrase_file(files.passphrase_file, passphrase, overwrite=replace)
    write_encrypted_key(files.key, tsu_key, passphrase, overwrite=replace)
    write_new_file(files.certificate, _pem(tsu), overwrite=replace)
    return files


def _name(country: str, organization: str, common_name: str) -> x509.Name:
    """C, O and CN: the TSA's registered name and the unit (SPEC CRT-05, EN 319 422 §6.2)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, country),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _issued_by(
    issuer: x509.Certificate, subject: x509.Name, key: PrivateKey, start: datetime, years: int
) -> x509.CertificateBuilder:
    """A builder for a certificate under ``issuer``, with SKI and AKI so that chains are built by key id."""
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(_add_years(start, years))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )


def _sign(builder: x509.CertificateBuilder, issuer_key: PrivateKey, rsa_pss: bool) -> x509.Certificate:
    """Sign with the issuer's key: its curve's hash, PureEdDSA, or RSA SHA-256 (PSS when asked)."""
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey):
        return builder.sign(issuer_key, None)
    algorithm = _CERT_HASHES[default_signature_hash(issuer_key)]()
    if isinstance(issuer_key, rsa.RSAPrivateKey) and rsa_pss:
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        return builder.sign(issuer_key, algorithm, rsa_padding=pss)
    return builder.sign(issuer_key, algorithm)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _add_years(moment: datetime, years: int) -> datetime:
    """The same calendar day ``years`` later; 29 February becomes 28 February in a common year."""
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:
        return moment.replace(year=moment.year + years, day=28)


def _make_private_dir(path: Path) -> None:
    """A directory only its owner can enter, tightened before any secret is written into it."""
    try:
        path.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, SECRET_DIR_MODE)
    except OSError as e:
        raise PKIError(f"cannot create the directory {path}: {e.strerror}") from e
