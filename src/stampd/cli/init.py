"""`stampd init`: a working TSA in one directory, with a demo PKI and a commented configuration."""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from stampd.config import load_config
from stampd.errors import ConfigError
from stampd.pki.demo import DemoPki, TsuFiles, add_demo_tsu, create_demo_pki
from stampd.records.migrate import upgrade
from stampd.signers.keyfile import (
    DEFAULT_KEY_TYPE,
    KeyType,
    default_signature_hash,
    generate_private_key,
    new_passphrase,
    write_encrypted_key,
    write_new_file,
    write_passphrase_file,
)

CONFIG_NAME = "stampd.toml"
DEFAULT_LISTEN = "127.0.0.1:3180"
MAX_NAME_LENGTH = 64
"""ub-common-name and ub-organization-name (RFC 5280 Appendix A)."""

PSS_WARNING = (
    "warning: RSA-PSS time-stamp tokens are rejected by many clients (e.g. older OpenSSL, Java, Windows); "
    "use PKCS#1 v1.5 unless every relying party is known to accept PSS"
)

ED25519_WARNING = (
    "warning: OpenSSL (`openssl ts -verify`, `openssl cms -verify`) cannot verify Ed25519 time-stamp tokens "
    "and many other clients do not support them; use ec-p256 unless every relying party accepts Ed25519"
)

_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+")

_CONFIG_TEMPLATE = """\
# stampd configuration, written by `stampd init` (comments explain each field).
# Relative paths are resolved against the directory of this file.

[server]
# HOST:PORT for HTTP (RFC 3161 §3.4); put a reverse proxy in front for TLS
listen = "{listen}"
max_request_bytes = 65536        # larger bodies get HTTP 413 before they are read
request_timeout = "10s"          # a client that stalls longer than this is cut off
workers = 1                      # processes; serial numbers stay unique across them

[records]
url = "sqlite:///records.sqlite3"   # every token is recorded here before it is returned
# Tokens and events are hash-chained; every checkpoint_interval (and at stop) the chain heads are signed with
# this key (encrypted PKCS#8, Ed25519). `stampd audit verify` checks both; relying on the public key
# pki/checkpoint-public.pem alone: `stampd audit verify --public-key pki/checkpoint-public.pem`
checkpoint_key = "pki/checkpoint-key.pem"
checkpoint_passphrase_file = "secrets/checkpoint.pass"
checkpoint_interval = "5m"

[clock]
accuracy = "1s"                  # declared in every token (TSTInfo.accuracy)
# Without ntp_servers the clock is NOT monitored (demo profile): tokens carry the host's time unchecked, and the
# start-up log and GET /readyz say so. A production TSA lists its NTP servers and sets required = true; tokens
# are then issued only while the agreeing servers prove the clock within accuracy - safety_margin, and refused
# with timeNotAvailable otherwise. Durations are strings with a unit: "us", "ms", "s", "m" or "h".
# "host:port" entries; empty = unmonitored demo profile
# ntp_servers = ["ntp1.example.net:123", "ntp2.example.net:123", "ntp3.example.net:123"]
# check_interval = "16s"         # how often every server is queried
# query_timeout = "1s"           # a server that has not answered by then counts as unreachable
# min_agree = 2                  # servers that must agree; default: a majority of ntp_servers
# safety_margin = "100ms"        # issue only while the error bound <= accuracy - margin; also the step threshold
# max_age = "60s"                # no tokens once the last good check is older than this
# leap_second = "pause"          # "pause": no tokens around a leap second; "smear": its offset widens the bound
# smear_window = "24h"           # length of the smear, centred on the leap second (leap_second = "smear")
# the tz database's leap-seconds.list (this is the default); "" disables the table
# leap_seconds_file = "/usr/share/zoneinfo/leap-seconds.list"
# kernel_discipline = true       # the kernel's adjtimex "unsynchronised" flag counts against issuance
# required = false               # true = production: refuse to start without ntp_servers

"""

_TSU_TEMPLATE = """\

[tsu.{name}]
# URL path served; the first TSU also answers at "/" unless another TSU has that path
path = "{path}"
# EKU id-kp-timeStamping only, critical (checked at start-up)
certificate = "{certificate}"
chain = ["pki/issuing-ca.pem"]               # intermediates sent when certReq is set
trust_anchor = "pki/root.pem"                # the chain is checked against it at start-up
# policy in tokens whose request names none; a fresh OID under the UUID arc 2.25 (ITU-T X.667)
default_policy = "{policy}"
# reqPolicy values that are granted; any other gets rejection + unacceptedPolicy
accepted_policies = ["{policy}"]
hash_algorithms = ["sha256", "sha384", "sha512"]   # also: sha224, sha3-256, sha3-384, sha3-512, sha1 (weak)
gen_time_precision = "ms"                    # "s", "ms" or "us"; trailing zeros are never written
# hash of the signature over the signed attributes (sha512 for Ed25519, RFC 8419)
signature_hash = "{signature_hash}"
# RSASSA-PSS instead of PKCS#1 v1.5 (RSA keys only; many clients reject PSS tokens)
rsa_pss = {rsa_pss}
# true adds the ETSI EN 319 422 qcStatements extension (esi4-qtstStatement-1) to every token of this TSU
qualified = {qualified}
# accuracy = "1s"                            # declared in this TSU's tokens; never better than clock.accuracy
# renew_before = "30d"                       # /readyz and the metrics warn this long before the key stops signing

[tsu.{name}.key]
# "file" (an encrypted PKCS#8 file) or "pkcs11" (module, token_label, key_label, pin_file or pin_env)
backend = "file"
path = "{key}"
# or set passphrase_env = "VARIABLE"
passphrase_file = "{passphrase}"
"""


@dataclass(frozen=True, slots=True)
class TsuSection:
    """One [tsu.NAME] table of the generated configuration."""

    name: str
    path: str
    certificate: str
    key: str
    passphrase: str
    policy: str
    signature_hash: str
    rsa_pss: bool
    qualified: bool = False


def render_tsu(section: TsuSection) -> str:
    return _TSU_TEMPLATE.format(
        name=section.name,
        path=section.path,
        certificate=section.certificate,
        key=section.key,
        passphrase=section.passphrase,
        policy=section.policy,
        signature_hash=section.signature_hash,
        rsa_pss=_toml_bool(section.rsa_pss),
        qualified=_toml_bool(section.qualified),
    )


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"


def new_policy_oid() -> str:
    """A policy OID nobody else has, without registering an arc: 2.25.<UUID as integer> (ITU-T X.667 §6.3)."""
    return f"2.25.{uuid.uuid4().int}"


def render_config(
    *, listen: str, policy: str, signature_hash: str, rsa_pss: bool, tsus: list[TsuSection] | None = None
) -> str:
    """The commented stampd.toml for the demo layout (paths relative to the file): the TSUs given, or one TSU
    named ``default`` at "/" with the demo PKI's TSU files."""
    default = TsuSection(
        "default", "/", "pki/tsu.pem", "pki/tsu-key.pem", "secrets/tsu.pass", policy, signature_hash, rsa_pss
    )
    return _CONFIG_TEMPLATE.format(listen=listen) + "".join(render_tsu(t) for t in (tsus or [default]))


def _create_checkpoint_key(pki_dir: Path, secrets_dir: Path, *, overwrite: bool) -> None:
    """The Ed25519 key that signs the records' chain heads (records.checkpoint_key), encrypted, 0600; and its
    public key for auditors."""
    key = generate_private_key(KeyType.ED25519)
    passphrase = new_passphrase()
    write_passphrase_file(secrets_dir / "checkpoint.pass", passphrase, overwrite=overwrite)
    write_encrypted_key(pki_dir / "checkpoint-key.pem", key, passphrase, overwrite=overwrite)
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    write_new_file(pki_dir / "checkpoint-public.pem", public, overwrite=overwrite)


def _validate_listen(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """HOST:PORT with a bracketed IPv6 literal or a name/IPv4 address, and a port in 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {value!r}")
    return value


def _validate_country(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Two-letter ISO 3166 code, as countryName requires (RFC 5280 Appendix A)."""
    if not re.fullmatch(r"[A-Za-z]{2}", value):
        raise click.BadParameter(f"expected a two-letter ISO 3166 country code, got {value!r}")
    return value.upper()


def _validate_tsus(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[tuple[str, bool]]:
    """NAME or NAME:qualified, names unique and usable as a URL path segment and a TOML key."""
    tsus: list[tuple[str, bool]] = []
    for spec in value:
        name, _, flag = spec.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", name) or flag not in ("", "qualified"):
            raise click.BadParameter(f"expected NAME or NAME:qualified (NAME: letters, digits, - and _), got {spec!r}")
        if name in ("healthz", "readyz", "metrics", "certs"):
            raise click.BadParameter(f"/{name} is one of the server's own endpoints; choose another TSU name")
        if name in (t[0] for t in tsus):
            raise click.BadParameter(f"TSU {name!r} is given twice")
        tsus.append((name, flag == "qualified"))
    return tsus


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=DEFAULT_KEY_TYPE.value,
    show_default=True,
    help="Key type of the TSU and of the demo CAs.",
)
@click.option("--rsa-pss", is_flag=True, help="Sign tokens with RSASSA-PSS (RSA key types only).")
@click.option(
    "--organization",
    default="stampd demo TSA",
    show_default=True,
    help="The TSA's full registered name (certificate O).",
)
@click.option(
    "--country",
    default="XX",
    show_default=True,
    callback=_validate_country,
    help="ISO 3166 country code (certificate C); XX is reserved for user assignment.",
)
@click.option("--name", "tsu_name", default="1", show_default=True, help="Names the TSU in its certificate CN.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, callback=_validate_listen, help="HOST:PORT.")
@click.option(
    "--tsu",
    "tsu_specs",
    multiple=True,
    metavar="NAME[:qualified]",
    callback=_validate_tsus,
    help="A TSU served at /NAME, with its own key and certificate (repeatable; the first also answers at /). "
    "':qualified' adds the ETSI qualified-token statement. Without --tsu: one TSU named default.",
)
@click.option("--force", is_flag=True, help="Replace an existing PKI and configuration in DIRECTORY.")
def command(
    *,
    directory: Path,
    key_type: str,
    rsa_pss: bool,
    organization: str,
    country: str,
    tsu_name: str,
    listen: str,
    tsu_specs: list[tuple[str, bool]],
    force: bool,
) -> None:
    """Create DIRECTORY with a demo PKI (root CA, issuing CA, TSU certificate) and a commented stampd.toml.

    Private keys are encrypted; their passphrases are in DIRECTORY/secrets (mode 0700). The PKI is for a
    closed community: relying parties must trust DIRECTORY/pki/root.pem.
    """
    kind = KeyType(key_type)
    if rsa_pss and not kind.is_rsa:
        raise ConfigError(f"--rsa-pss needs an RSA key type (rsa-2048, rsa-3072 or rsa-4096), not {kind}")
    common_name = f"{organization} TSU {tsu_name}"
    if not organization.strip() or len(organization) > MAX_NAME_LENGTH or len(common_name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"--organization must be 1-{MAX_NAME_LENGTH} characters and the TSU name {common_name!r} "
            f"at most {MAX_NAME_LENGTH}"
        )
    config_path = directory / CONFIG_NAME
    existing = [p for p in (config_path, directory / "pki", *DemoPki.at(directory).existing()) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{directory} already holds a stampd installation ({existing[0]}); use --force to replace it")
    if rsa_pss:
        click.echo(PSS_WARNING, err=True)
    if kind is KeyType.ED25519:
        click.echo(ED25519_WARNING, err=True)

    directory.mkdir(parents=True, exist_ok=True)
    pki = create_demo_pki(
        directory,
        key_type=kind,
        rsa_pss=rsa_pss,
        organization=organization,
        country=country,
        tsu_name=tsu_specs[0][0] if tsu_specs else tsu_name,
        now=datetime.now(UTC),
        replace=force,
    )
    _create_checkpoint_key(pki.root_certificate.parent, pki.ca_passphrase_file.parent, overwrite=force)
    tsu_certificate = x509.load_pem_x509_certificate(pki.tsu_certificate.read_bytes())
    signature_hash = default_signature_hash(tsu_certificate.public_key())
    policy = new_policy_oid()
    sections: list[TsuSection] = []
    for index, (name, qualified) in enumerate(tsu_specs):
        if index == 0:
            files = TsuFiles(pki.tsu_certificate, pki.tsu_key, pki.tsu_passphrase_file)
        else:
            files = add_demo_tsu(
                directory,
                name=name,
                key_type=kind,
                rsa_pss=rsa_pss,
                organization=organization,
                country=country,
                now=datetime.now(UTC),
                replace=force,
            )
        sections.append(
            TsuSection(
                name=name,
                path=f"/{name}",
                certificate=str(files.certificate.relative_to(directory)),
                key=str(files.key.relative_to(directory)),
                passphrase=str(files.passphrase_file.relative_to(directory)),
                policy=policy if index == 0 else new_policy_oid(),
                signature_hash=signature_hash,
                rsa_pss=rsa_pss,
                qualified=qualified,
            )
        )
    config = render_config(listen=listen, policy=policy, signature_hash=signature_hash, rsa_pss=rsa_pss, tsus=sections)
    write_new_file(config_path, config.encode("utf-8"), overwrite=force)
    upgrade(load_config(config_path).records.url)  # the records database, ready for `stampd serve`

    click.echo(f"Created a time-stamping authority in {directory}")
    for section in sections or [TsuSection("default", "/", str(pki.tsu_certificate), "", "", policy, "", False)]:
        flag = ", qualified" if section.qualified else ""
        click.echo(f"  TSU {section.name} at {section.path}: {section.certificate} ({kind}, {signature_hash}{flag})")
        click.echo(f"    default policy {section.policy}")
    click.echo(f"  Configuration:   {config_path}")
    click.echo(f"  Passphrases:     {pki.ca_passphrase_file.parent} (keep private; back up the CA keys offline)")
    click.echo(f"Start the server:  stampd serve -c {shlex.quote(str(config_path))}")
    click.echo(f"Trust anchor: {pki.root_certificate}")
