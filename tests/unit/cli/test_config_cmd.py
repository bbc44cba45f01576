"""`stampd config check` and `stampd config show` (issue 6, configuration): start-up's checks without serving,
errors that name the file and the field, and the effective configuration with no secret in it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from stampd.cli.config import toml_text
from stampd.cli.main import cli
from stampd.config import format_duration_us, load_config, parse_duration_us, to_mapping
from stampd.records.engine import mask_url


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def tsa(tmp_path: Path) -> Path:
    """A `stampd init` directory with two TSUs; its stampd.toml."""
    code, out, err = _invoke("init", str(tmp_path / "tsa"), "--tsu", "a", "--tsu", "b")
    assert code == 0, out + err
    return tmp_path / "tsa" / "stampd.toml"


def test_check_passes_a_good_configuration_in_one_line(tsa: Path) -> None:
    code, out, err = _invoke("config", "check", str(tsa))
    assert code == 0, err
    (line,) = out.splitlines()
    assert line.startswith(f"{tsa}: OK: 2 TSUs; keys, certificates, chains and self-test tokens of a, b; records")


def test_check_names_the_file_and_the_field(tsa: Path) -> None:
    tsa.write_text(tsa.read_text().replace("[server]\n", "[server]\nworkerz = 2\n", 1))
    code, out, err = _invoke("config", "check", str(tsa))
    assert (code, out) == (1, "")
    assert err.strip() == f"stampd: error: {tsa}: server.workerz: unknown setting"


def test_check_refuses_a_binary_file_and_never_prints_a_database_password(tsa: Path) -> None:
    """A file that is not UTF-8 is a named error, not a traceback; a records URL that cannot be reached is named
    in the error with its passwords (in the user information and as libpq's ?password=) masked."""
    binary = tsa.with_name("binary.toml")
    binary.write_bytes(b"[server]\nlisten = '\xff'\n")
    code, _, err = _invoke("config", "check", str(binary))
    assert code == 1
    assert err.startswith(f"stampd: error: {binary}: not valid TOML: not UTF-8 text")

    text = tsa.read_text()
    url_line = next(line for line in text.splitlines() if line.startswith("url = "))
    tsa.write_text(text.replace(url_line, 'url = "postgresql://stampd:hunter2@127.0.0.1:1/stampd?password=s3cret"'))
    code, _, err = _invoke("config", "check", str(tsa))
    assert code == 1
    assert "postgresql://stampd:***@127.0.0.1:1/stampd?password=***" in err
    assert "hunter2" not in err and "s3cret" not in err


def test_check_opens_the_keys_and_matches_the_certificates(tsa: Path) -> None:
    """What only start-up used to find: a's certificate swapped for b's (key mismatch), then a wrong passphrase."""
    text = tsa.read_text()
    a = load_config(tsa).tsus[0]
    assert 'certificate = "pki/tsu.pem"' in text and 'certificate = "pki/tsu-b.pem"' in text
    tsa.write_text(text.replace('certificate = "pki/tsu.pem"', 'certificate = "pki/tsu-b.pem"', 1))
    code, _, err = _invoke("config", "check", str(tsa))
    assert code == 1
    assert f"{tsa}: tsu.a: the key does not match the certificate" in err

    tsa.write_text(text)
    assert a.key.passphrase_file is not None
    a.key.passphrase_file.write_text("not the passphrase\n")
    code, _, err = _invoke("config", "check", str(tsa))
    assert code == 1 and err.startswith(f"stampd: error: {tsa}: ") and "tsu.a" in err


def test_check_needs_the_records_at_the_expected_schema(tsa: Path) -> None:
    Path(load_config(tsa).records.url.removeprefix("sqlite:///")).unlink()
    code, _, err = _invoke("config", "check", str(tsa))
    assert code == 1 and "cannot open the records" in err


def test_show_prints_every_default_and_loads_back_to_the_same_configuration(tsa: Path, tmp_path: Path) -> None:
    code, out, err = _invoke("config", "show", "-c", str(tsa))
    assert code == 0, err
    shown = tomllib.loads(out)
    assert shown["server"]["request_timeout"] == "10s" and shown["server"]["log_format"] == "json"
    assert shown["clock"]["check_interval"] == "16s" and shown["clock"]["leap_second"] == "pause"
    assert shown["tsu"]["a"]["gen_time_precision"] == "ms" and shown["tsu"]["a"]["key"]["backend"] == "file"
    again = tmp_path / "elsewhere" / "shown.toml"
    again.parent.mkdir()
    again.write_text(out)
    original = load_config(tsa.absolute())
    assert dataclasses.replace(load_config(again), source=original.source) == original
    code, out_json, _ = _invoke("config", "show", "-c", str(tsa), "--json")
    assert code == 0 and json.loads(out_json) == shown


def test_to_mapping_round_trips_settings_away_from_their_defaults(tmp_path: Path) -> None:
    """Every kind of setting: durations, lists, sets, IPv6 listen, a PKCS#11 key, a next key, TLS files, trusted
    proxies, subscribers-only access, an explicit accuracy, and the leap-second table turned off."""
    for name in ("tsu.pem", "root.pem", "next.pem", "tls.pem", "tls.key", "hsm.so"):
        (tmp_path / name).write_text("x")
    config_file = tmp_path / "stampd.toml"
    config_file.write_text(
        """
[server]
listen = "[::1]:8318"
workers = 3
request_timeout = "2500ms"
tls_certificate = "tls.pem"
tls_key = "tls.key"
trusted_proxies = ["10.0.0.0/8", "::1/128"]
log_format = "text"
[records]
url = "postgresql://stampd@db.example.net/stampd"
checkpoint_interval = "90s"
[clock]
accuracy = "500ms"
ntp_servers = ["127.0.0.1:123", "127.0.0.2:123", "127.0.0.3:123"]
min_agree = 3
leap_second = "smear"
leap_seconds_file = ""
kernel_discipline = false
required = true
[access]
ledger = "redis://127.0.0.1:6379/2"
[tsu.eu]
path = "/eu/v1"
certificate = "tsu.pem"
trust_anchor = "root.pem"
default_policy = "1.2.3.4"
accepted_policies = ["1.2.3.5", "1.2.3.4"]
hash_algorithms = ["sha512", "sha384"]
gen_time_precision = "us"
signature_hash = "sha384"
qualified = true
accuracy = "750ms"
renew_before = "45d"
access = "subscribers"
subscribers = ["bob", "alice"]
[tsu.eu.key]
backend = "pkcs11"
module = "hsm.so"
token_label = "stampd"
key_label = "eu-2027"
pin_env = "STAMPD_PIN"
sessions = 8
[tsu.eu.next]
activate_at = "2027-06-01T00:00:00+00:00"
certificate = "next.pem"
[tsu.eu.next.key]
path = "next-key.pem"
passphrase_env = "STAMPD_NEXT"
"""
    )
    config = load_config(config_file)
    again = tmp_path / "again.toml"
    again.write_text(toml_text(to_mapping(config)))
    assert dataclasses.replace(load_config(again), source=config.source) == config
    shown = tomllib.loads(again.read_text())
    assert shown["server"]["listen"] == "[::1]:8318" and shown["server"]["request_timeout"] == "2500ms"
    assert shown["tsu"]["eu"]["subscribers"] == ["alice", "bob"]


def test_show_masks_passwords_and_shows_only_references_to_secrets(tsa: Path) -> None:
    text = tsa.read_text()
    url_line = next(line for line in text.splitlines() if line.startswith("url = "))
    text = text.replace(url_line, 'url = "postgresql://stampd:hunter2-secret@db.example.net/stampd?password=s3cret"')
    tsa.write_text(text + '\n[access]\nledger = "redis://:redis-secret@127.0.0.1:6379/0"\n')
    passphrase_file = load_config(tsa).tsus[0].key.passphrase_file
    assert passphrase_file is not None
    passphrase = passphrase_file.read_text().strip()
    code, out, err = _invoke("config", "show", "-c", str(tsa))
    assert code == 0, err
    for secret in ("hunter2-secret", "s3cret", "redis-secret", passphrase):
        assert secret not in out
    shown = tomllib.loads(out)
    assert shown["records"]["url"] == "postgresql://stampd:***@db.example.net/stampd?password=***"
    assert shown["access"]["ledger"] == "redis://:***@127.0.0.1:6379/0"
    assert shown["tsu"]["a"]["key"]["passphrase_file"] == str(passphrase_file.absolute())


def test_mask_url_leaves_urls_without_passwords_alone() -> None:
    for url in ("sqlite:////var/lib/stampd/records.sqlite3", "postgresql://stampd@db/stampd?sslmode=require"):
        assert mask_url(url) == url


@pytest.mark.parametrize("text", ["16s", "100ms", "250us", "1d", "5y", "90m", "1h", "2500ms"])
def test_durations_format_back_to_what_they_parse_from(text: str) -> None:
    assert format_duration_us(parse_duration_us(text)) == text
