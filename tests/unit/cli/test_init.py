"""`stampd init`: demo PKI, configuration and refusals (SPEC CRT-01..05, ALG-01..04, TST-02)."""

from __future__ import annotations

import re
import stat
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from stampd.app import load_tsu
from stampd.cli import main as cli_main
from stampd.cli.init import ED25519_WARNING, PSS_WARNING, new_policy_oid
from stampd.config import DEFAULT_LEAP_SECONDS_FILE, ClockConfig, load_config
from stampd.signers import FileSigner, load_encrypted_key, read_passphrase_file


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, ["init", *args])


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run through the real entry point, where a StampdError becomes exit status 2."""
    monkeypatch.setattr(sys, "argv", ["stampd", "init", *args])
    with pytest.raises(SystemExit) as excinfo:
        cli_main.main()
    code = excinfo.value.code
    assert isinstance(code, int)
    return code


def config_of(directory: Path) -> dict[str, Any]:
    with (directory / "stampd.toml").open("rb") as f:
        return tomllib.load(f)


@pytest.fixture
def tsa(tmp_path: Path) -> tuple[Path, Result]:
    directory = tmp_path / "tsa"
    result = run(str(directory), "--organization", "Example TSA Ltd", "--country", "gb", "--name", "lon-1")
    assert result.exit_code == 0, result.output
    return directory, result


def test_summary_ends_with_trust_anchor(tsa: tuple[Path, Result]) -> None:
    directory, result = tsa
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"Trust anchor: {directory}/pki/root.pem"
    assert f"stampd serve -c {directory}/stampd.toml" in result.stdout


def test_output_never_shows_passphrases(tsa: tuple[Path, Result]) -> None:
    directory, result = tsa
    for name in ("ca.pass", "tsu.pass"):
        assert read_passphrase_file(directory / "secrets" / name).decode() not in result.output


def test_config_has_the_schema(tsa: tuple[Path, Result]) -> None:
    directory, _ = tsa
    config = config_of(directory)
    assert config["server"] == {
        "listen": "127.0.0.1:3180",
        "max_request_bytes": 65536,
        "request_timeout": "10s",
        "workers": 1,
    }
    assert config["records"] == {
        "url": "sqlite:///records.sqlite3",
        "checkpoint_key": "pki/checkpoint-key.pem",
        "checkpoint_passphrase_file": "secrets/checkpoint.pass",
        "checkpoint_interval": "5m",
    }
    assert config["clock"] == {"accuracy": "1s"}
    tsu = config["tsu"]["default"]
    assert tsu["path"] == "/"
    assert tsu["certificate"] == "pki/tsu.pem"
    assert tsu["chain"] == ["pki/issuing-ca.pem"]
    assert tsu["trust_anchor"] == "pki/root.pem"
    assert tsu["accepted_policies"] == [tsu["default_policy"]]
    assert tsu["hash_algorithms"] == ["sha256", "sha384", "sha512"]
    assert tsu["gen_time_precision"] == "ms"
    assert tsu["signature_hash"] == "sha256"
    assert tsu["rsa_pss"] is False
    assert tsu["key"] == {
        "backend": "file",
        "path": "pki/tsu-key.pem",
        "passphrase_file": "secrets/tsu.pass",
    }
    assert set(tsu) == {
        "path", "certificate", "chain", "trust_anchor", "default_policy", "accepted_policies",
        "hash_algorithms", "gen_time_precision", "signature_hash", "rsa_pss", "qualified", "key",
    }  # fmt: skip


CLOCK_SETTINGS = [
    "ntp_servers", "check_interval", "query_timeout", "min_agree", "safety_margin", "max_age",
    "leap_second", "smear_window", "leap_seconds_file", "kernel_discipline", "required",
]  # fmt: skip


def clock_table(text: str) -> str:
    start = text.index("[clock]\n")
    return text[start : text.index("\n[", start + 1)]


def uncomment_clock(text: str, **values: str) -> str:
    """The configuration with every commented-out `key = value` of [clock] active, some values replaced."""
    table = clock_table(text)

    def setting(match: re.Match[str]) -> str:
        key = match.group(1)
        return f"{key} = {values.get(key, match.group(2))}"

    return text.replace(table, re.sub(r"^# (\w+) = (.+?)(?:[ \t]+#.*)?$", setting, table, flags=re.M))


def test_demo_clock_is_unmonitored_and_loads(tsa: tuple[Path, Result]) -> None:
    """Only accuracy is set: no ntp_servers, so the demo issues with time unmonitored (the defaults apply)."""
    directory, _ = tsa
    text = (directory / "stampd.toml").read_text()
    table = clock_table(text)
    for key in CLOCK_SETTINGS:
        assert re.search(rf"^# {key} = ", table, re.M), f"{key} is not documented in [clock]"
    assert load_config(directory / "stampd.toml").clock == ClockConfig(accuracy_us=1_000_000)


def test_uncommented_clock_settings_load(tsa: tuple[Path, Result]) -> None:
    """Every commented clock setting is valid TOML for load_config, and its value is the documented default."""
    directory, _ = tsa
    config_file = directory / "stampd.toml"
    config_file.write_text(uncomment_clock(config_file.read_text()))
    clock = load_config(config_file).clock
    assert clock == ClockConfig(
        accuracy_us=1_000_000,
        ntp_servers=("ntp1.example.net:123", "ntp2.example.net:123", "ntp3.example.net:123"),
        min_agree=2,
    )
    assert clock.leap_seconds_file == DEFAULT_LEAP_SECONDS_FILE


def test_production_clock_settings_load(tsa: tuple[Path, Result]) -> None:
    directory, _ = tsa
    config_file = directory / "stampd.toml"
    config_file.write_text(
        uncomment_clock(
            config_file.read_text(),
            ntp_servers='["127.0.0.1:123"]',
            min_agree="1",
            check_interval='"2s"',
            query_timeout='"500ms"',
            safety_margin='"250ms"',
            max_age='"10s"',
            leap_second='"smear"',
            smear_window='"12h"',
            leap_seconds_file='"leap-seconds.list"',
            kernel_discipline="false",
            required="true",
        )
    )
    assert load_config(config_file).clock == ClockConfig(
        accuracy_us=1_000_000,
        ntp_servers=("127.0.0.1:123",),
        check_interval_us=2_000_000,
        query_timeout_us=500_000,
        min_agree=1,
        safety_margin_us=250_000,
        max_age_us=10_000_000,
        leap_second="smear",
        smear_window_us=12 * 3_600_000_000,
        leap_seconds_file=directory / "leap-seconds.list",
        kernel_discipline=False,
        required=True,
    )


def test_default_policy_is_a_fresh_uuid_oid_tst_02(tsa: tuple[Path, Result], tmp_path: Path) -> None:
    """TST-02: a documented default policy; under 2.25 (X.667) it needs no registration to be unique."""
    directory, result = tsa
    policy = config_of(directory)["tsu"]["default"]["default_policy"]
    root, arc, value = policy.split(".")
    assert (root, arc) == ("2", "25")
    assert 0 < int(value) < 2**128
    assert policy in result.stdout
    assert run(str(tmp_path / "other")).exit_code == 0
    assert config_of(tmp_path / "other")["tsu"]["default"]["default_policy"] != policy
    assert new_policy_oid() != new_policy_oid()


def test_config_paths_give_a_working_signer_crt_01_05(tsa: tuple[Path, Result]) -> None:
    """Everything the config names exists relative to it, and the key signs for the certificate."""
    directory, _ = tsa
    tsu = config_of(directory)["tsu"]["default"]
    certificate = x509.load_pem_x509_certificate((directory / tsu["certificate"]).read_bytes())
    anchor = x509.load_pem_x509_certificate((directory / tsu["trust_anchor"]).read_bytes())
    (issuing,) = [x509.load_pem_x509_certificate((directory / p).read_bytes()) for p in tsu["chain"]]
    certificate.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(anchor)

    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    assert certificate.subject.rfc4514_string() == "CN=Example TSA Ltd TSU lon-1,O=Example TSA Ltd,C=GB"

    passphrase = read_passphrase_file(directory / tsu["key"]["passphrase_file"])
    key = load_encrypted_key(directory / tsu["key"]["path"], passphrase)
    signer = FileSigner(key, tsu["signature_hash"], rsa_pss=tsu["rsa_pss"])
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert signer.signature_algorithm == bytes.fromhex("300A06082A8648CE3D040302")  # ALG-03
    public_key.verify(signer.sign(b"attrs"), b"attrs", ec.ECDSA(hashes.SHA256()))


def test_secret_modes(tsa: tuple[Path, Result]) -> None:
    directory, _ = tsa
    assert stat.S_IMODE((directory / "secrets").stat().st_mode) == 0o700
    for path in [*(directory / "secrets").iterdir(), *(directory / "pki").glob("*-key.pem")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize(("key_type", "signature_hash"), [("ed25519", "sha512"), ("ec-p384", "sha384")])
def test_signature_hash_follows_the_key_alg_03_04(key_type: str, signature_hash: str, tmp_path: Path) -> None:
    result = run(str(tmp_path), "--key-type", key_type)
    assert result.exit_code == 0, result.output
    tsu = config_of(tmp_path)["tsu"]["default"]
    assert tsu["signature_hash"] == signature_hash
    key = load_encrypted_key(tmp_path / "pki/tsu-key.pem", read_passphrase_file(tmp_path / "secrets/tsu.pass"))
    FileSigner(key, tsu["signature_hash"], rsa_pss=tsu["rsa_pss"])  # the configuration is consistent


def test_listen_is_written(tmp_path: Path) -> None:
    assert run(str(tmp_path), "--listen", "[::1]:8318").exit_code == 0
    assert config_of(tmp_path)["server"]["listen"] == "[::1]:8318"


@pytest.mark.parametrize(
    "args",
    [["--listen", "localhost"], ["--listen", "0.0.0.0:99999"], ["--listen", 'a"b:1'], ["--country", "DEU"]],
)
def test_bad_options_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = run(str(tmp_path / "tsa"), *args)
    assert result.exit_code == 2
    assert not (tmp_path / "tsa").exists()


def test_refuses_existing_installation_without_force(
    tsa: tuple[Path, Result], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = tsa
    before = (directory / "pki" / "tsu.pem").read_bytes()
    config_before = (directory / "stampd.toml").read_bytes()
    assert run_main(monkeypatch, str(directory)) == 2
    assert "--force" in capsys.readouterr().err
    assert (directory / "pki" / "tsu.pem").read_bytes() == before
    assert (directory / "stampd.toml").read_bytes() == config_before


def test_refuses_existing_pki_without_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pki").mkdir()
    assert run_main(monkeypatch, str(tmp_path)) == 2
    assert "already holds" in capsys.readouterr().err
    assert not (tmp_path / "stampd.toml").exists()


def test_force_replaces_pki_and_config(tsa: tuple[Path, Result]) -> None:
    directory, _ = tsa
    before = (directory / "pki" / "tsu.pem").read_bytes()
    policy = config_of(directory)["tsu"]["default"]["default_policy"]
    result = run(str(directory), "--force", "--key-type", "ed25519")
    assert result.exit_code == 0, result.output
    assert (directory / "pki" / "tsu.pem").read_bytes() != before
    tsu = config_of(directory)["tsu"]["default"]
    assert tsu["default_policy"] != policy
    assert tsu["signature_hash"] == "sha512"
    assert stat.S_IMODE((directory / "pki" / "tsu-key.pem").stat().st_mode) == 0o600


def test_rsa_pss_with_ec_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(monkeypatch, str(tmp_path / "tsa"), "--rsa-pss") == 2
    assert "RSA key type" in capsys.readouterr().err
    assert not (tmp_path / "tsa").exists()


def test_rsa_pss_warns_and_configures_pss_alg_02(tmp_path: Path) -> None:
    result = run(str(tmp_path), "--key-type", "rsa-2048", "--rsa-pss")
    assert result.exit_code == 0, result.output
    assert PSS_WARNING in result.stderr
    for client in ("OpenSSL", "Java", "Windows"):
        assert client in result.stderr
    assert "warning" not in result.stdout
    tsu = config_of(tmp_path)["tsu"]["default"]
    assert tsu["rsa_pss"] is True
    assert tsu["signature_hash"] == "sha256"
    certificate = x509.load_pem_x509_certificate((tmp_path / "pki/tsu.pem").read_bytes())
    assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS


def test_ed25519_warns_about_verifier_support_alg_04(tmp_path: Path) -> None:
    result = run(str(tmp_path), "--key-type", "ed25519")
    assert result.exit_code == 0, result.output
    assert ED25519_WARNING in result.stderr


def test_rsa_without_pss_uses_pkcs1_alg_01(tmp_path: Path) -> None:
    result = run(str(tmp_path), "--key-type", "rsa-2048")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert config_of(tmp_path)["tsu"]["default"]["rsa_pss"] is False
    certificate = x509.load_pem_x509_certificate((tmp_path / "pki/tsu.pem").read_bytes())
    assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256


def test_too_long_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_main(monkeypatch, str(tmp_path / "tsa"), "--organization", "x" * 60) == 2
    assert not (tmp_path / "tsa").exists()


def test_command_is_registered() -> None:
    assert "init" in cli_main.cli.commands


def test_several_tsus_each_with_its_own_key_and_certificate(tmp_path: Path) -> None:
    """`--tsu NAME [--tsu NAME:qualified]`: one [tsu.NAME] table each, served at /NAME, own key and policy."""
    directory = tmp_path / "tsa"
    result = CliRunner().invoke(cli_main.cli, ["init", str(directory), "--tsu", "rfc3161", "--tsu", "qes:qualified"])
    assert result.exit_code == 0, result.output
    config = load_config(directory / "stampd.toml")
    assert [(t.name, t.path, t.qualified) for t in config.tsus] == [
        ("rfc3161", "/rfc3161", False),
        ("qes", "/qes", True),
    ]
    first, second = config.tsus
    assert first.default_policy != second.default_policy and first.key.path != second.key.path
    assert (second.key.path.stat().st_mode & 0o777) == 0o600
    names = [x509.load_pem_x509_certificate(t.certificate.read_bytes()).subject.rfc4514_string() for t in config.tsus]
    assert names == [
        "CN=stampd demo TSA TSU rfc3161,O=stampd demo TSA,C=XX",
        "CN=stampd demo TSA TSU qes,O=stampd demo TSA,C=XX",
    ]
    loaded = [load_tsu(t, datetime.now(UTC)) for t in config.tsus]
    assert loaded[0].certificate != loaded[1].certificate
    bad = CliRunner().invoke(cli_main.cli, ["init", str(tmp_path / "x"), "--tsu", "a", "--tsu", "a"])
    assert bad.exit_code == 2 and "given twice" in bad.output
