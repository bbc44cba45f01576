"""stampd.toml loading: defaults, resolution of relative paths, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stampd.config import config_path, load_config, parse_duration_us
from stampd.errors import ConfigError

MINIMAL = """
[tsu.default]
certificate = "pki/tsu.pem"
trust_anchor = "pki/root.pem"
default_policy = "2.25.7"
[tsu.default.key]
path = "pki/tsu-key.pem"
passphrase_file = "secrets/tsu.pass"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stampd.toml"
    path.write_text(text)
    return path


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 3180)
    assert config.server.max_request_bytes == 65536 and config.server.request_timeout_s == 10.0
    assert config.clock.accuracy_us == 1_000_000
    assert config.records.url == f"sqlite:///{tmp_path.resolve()}/records.sqlite3"
    (tsu,) = config.tsus
    assert tsu.path == "/" and tsu.gen_time_digits == 3
    assert tsu.hash_algorithms == {"sha256", "sha384", "sha512"}  # SHA-1 off unless enabled (REQ-03)
    assert tsu.certificate == tmp_path / "pki/tsu.pem"
    assert tsu.key.passphrase_file == tmp_path / "secrets/tsu.pass"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("16s", 16_000_000),
        ("500ms", 500_000),
        ("2m", 120_000_000),
        ("250us", 250),
        ("250µs", 250),
        ("1.5s", 1_500_000),
    ],
)
def test_durations_have_units(text: str, field: int) -> None:
    assert parse_duration_us(text) == field


@pytest.mark.parametrize("bad", ["16", "s", "1 sec", "-1s", ""])
def test_durations_without_units_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_us(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('[server]\nlisten = "nowhere"\n', "server.listen: expected HOST:PORT"),
        ("[server]\nworkers = 0\n", "server.workers: must be between"),
        ('[server]\nworkers = "two"\n', "server.workers: expected int"),
        ("[server]\nmax_request_bytes = true\n", "server.max_request_bytes: expected int"),
        ('[server]\nrequest_timeout = "10"\n', "server.request_timeout: expected a duration"),
        ('[clock]\naccuracy = "0s"\n', "clock.accuracy: must be positive"),
        ('[clock]\naccuracy = "99999h"\n', "clock.accuracy: must be at most 60s"),
        ('[server]\nrequest_timeout = "99999h"\n', "server.request_timeout: must be at most 10m"),
        ("[clock]\nntp_servers = [1]\n", "clock.ntp_servers: expected a list of strings"),
        ('[clock]\nntp_servers = ["nowhere"]\n', "clock.ntp_servers: expected"),
        ("[clock]\nrequired = true\n", "clock.required: a production clock"),
        ('[clock]\nntp_servers = ["a:1"]\nmin_agree = 2\n', "clock.min_agree: must be between 1 and the 1"),
        ('[clock]\nsafety_margin = "2s"\n', "clock.safety_margin: must be smaller"),
        ('[records]\nurl = "mysql://x"\n', "records.url: expected sqlite"),
        ("[server]\nlisten_port = 3\n", "server.listen_port: unknown setting"),
        ("[bogus]\n", "bogus: unknown setting"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, change: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, change + MINIMAL))
    assert str(e.value).startswith(str(tmp_path / "stampd.toml"))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('default_policy = "2.25.7"', 'default_policy = "policy-one"', "tsu.default.default_policy: 'policy-one'"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\nhash_algorithms = ["md5"]', "unknown hash 'md5'"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\ngen_time_precision = "ns"', "gen_time_precision"),
        ('default_policy = "2.25.7"\n', "", "tsu.default.default_policy: is required"),
        ('passphrase_file = "secrets/tsu.pass"', "", "set exactly one of passphrase_file and passphrase_env"),
        ('default_policy = "2.25.7"', 'default_policy = "1.50.3"', "tsu.default.default_policy: '1.50.3' is not"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\naccepted_policies = [5]', "accepted_policies: 5"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\nhash_algorithms = [["sha256"]]', "list of strings"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\nhash_algorithms = []', "at least one hash"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\npath = "/healthz"', "reserved"),
        ('default_policy = "2.25.7"', 'default_policy = "2.25.7"\npath = "/x/certs"', "reserved"),
        ('path = "pki/tsu-key.pem"', 'path = "pki/tsu-key.pem"\nbackend = "kms"', "unknown key backend 'kms'"),
    ],
)
def test_tsu_errors_name_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL.replace(old, new)))
    assert message in str(e.value)


def test_two_tsus_on_one_path_are_refused(tmp_path: Path) -> None:
    second = MINIMAL.replace("[tsu.default", "[tsu.other").replace("[tsu.other]", '[tsu.other]\npath = "/"')
    with pytest.raises(ConfigError, match="same path '/'"):
        load_config(write(tmp_path, MINIMAL + second))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stampd init"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"))


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAMPD_CONFIG", raising=False)
    assert config_path(None) == Path("stampd.toml")
    monkeypatch.setenv("STAMPD_CONFIG", "/etc/stampd/stampd.toml")
    assert config_path(None) == Path("/etc/stampd/stampd.toml")
    assert config_path("x.toml") == Path("x.toml")


# --- access control, TLS and trusted proxies (issue 6) ---


def test_access_defaults_public_and_reads_subscribers(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).tsus[0].access == "public"
    assert load_config(write(tmp_path, MINIMAL)).access.ledger == "records"
    text = MINIMAL.replace('default_policy = "2.25.7"', 'default_policy = "2.25.7"\naccess = "subscribers"')
    (tsu,) = load_config(write(tmp_path, text)).tsus
    assert (tsu.access, tsu.subscribers) == ("subscribers", None)  # every subscriber
    listed = text.replace('access = "subscribers"', 'access = "subscribers"\nsubscribers = ["acme", "corp.eu@x"]')
    assert load_config(write(tmp_path, listed)).tsus[0].subscribers == {"acme", "corp.eu@x"}
    redis = load_config(write(tmp_path, '[access]\nledger = "redis://127.0.0.1:6379/0"\n' + MINIMAL))
    assert redis.access.ledger == "redis://127.0.0.1:6379/0"


def test_tls_and_trusted_proxies_are_read(tmp_path: Path) -> None:
    for name in ("server.pem", "server-key.pem", "clients.pem"):
        (tmp_path / name).write_text("placeholder")
    server = (
        '[server]\ntls_certificate = "server.pem"\ntls_key = "server-key.pem"\ntls_client_ca = "clients.pem"\n'
        'trusted_proxies = ["127.0.0.1/32", "::1"]\n'
    )
    config = load_config(write(tmp_path, server + MINIMAL)).server
    assert config.tls is not None
    assert (config.tls.certificate, config.tls.client_ca) == (tmp_path / "server.pem", tmp_path / "clients.pem")
    assert config.tls.key_passphrase_file is None
    assert [str(n) for n in config.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    assert load_config(write(tmp_path, MINIMAL)).server.tls is None


def test_a_mistyped_ledger_url_is_refused_without_repeating_its_password(tmp_path: Path) -> None:
    """The error names the file and the field but not the value: a URL with a typo may still hold a password, and
    a refused reload writes the message to the log and the events."""
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, '[access]\nledger = "redis:/stampd:hunter2@127.0.0.1/0"\n' + MINIMAL))
    assert "stampd.toml: access.ledger: expected 'records' or a redis://" in str(refused.value)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('[server]\ntls_certificate = "server.pem"\n', "server.tls_certificate: set both tls_certificate and tls_key"),
        ('[server]\ntls_key = "server.pem"\n', "server.tls_key: set both"),
        ('[server]\ntls_client_ca = "server.pem"\n', "server.tls_client_ca: needs tls_certificate and tls_key"),
        ('[server]\ntls_certificate = "absent.pem"\ntls_key = "server.pem"\n', "server.tls_certificate: no such file"),
        ('[server]\ntrusted_proxies = ["10.0.0.0/33"]\n', "server.trusted_proxies: expected an address or CIDR"),
        ('[server]\ntrusted_proxies = ["10.0.0.1/8"]\n', "server.trusted_proxies: expected an address or CIDR"),
        ('[server]\ntrusted_proxies = "127.0.0.1"\n', "server.trusted_proxies: expected list"),
        ('[access]\nledger = "memcached://x"\n', "access.ledger: expected 'records' or a redis://, rediss:// or"),
        ("[access]\nquota = 5\n", "access.quota: unknown setting"),
    ],
)
def test_access_and_tls_errors_name_the_field(tmp_path: Path, change: str, message: str) -> None:
    (tmp_path / "server.pem").write_text("placeholder")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, change + MINIMAL))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("new", "message"),
    [
        ('access = "private"', "tsu.default.access: expected 'public' or 'subscribers'"),
        ('subscribers = ["acme"]', 'tsu.default.subscribers: lists subscribers, but the TSU is access = "public"'),
        ('access = "subscribers"\nsubscribers = ["a b"]', "tsu.default.subscribers: 'a b' is not a subscriber name"),
        ('access = "subscribers"\nsubscribers = "acme"', "tsu.default.subscribers: expected list"),
    ],
)
def test_tsu_access_errors_name_the_field(tmp_path: Path, new: str, message: str) -> None:
    text = MINIMAL.replace('default_policy = "2.25.7"', f'default_policy = "2.25.7"\n{new}')
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
