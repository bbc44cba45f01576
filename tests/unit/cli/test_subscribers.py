"""`stampd subscribers` and `stampd usage report` on a demo installation: round trips, the API token printed once
and only its hash stored, no secret in any output, clear refusals naming the option, every change an event that
`stampd audit verify` checks (issue 6)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, insert, select

from stampd.access import Credentials, verify_password
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.errors import Unauthorized
from stampd.records.schema import subscribers, tokens
from stampd.records.store import RecordStore
from stampd.records.subscribers import SubscriberStore

PASSWORD = "a long enough basic password"


@pytest.fixture(scope="module")
def tsa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tsa")
    result = CliRunner().invoke(cli, ["init", str(directory / "tsa")])
    assert result.exit_code == 0, result.output
    return directory / "tsa"


@pytest.fixture
def config(tsa: Path) -> str:
    return str(tsa / "stampd.toml")


def invoke(config: str, *args: str, stdin: str | None = None) -> Result:
    command, *rest = args
    return CliRunner().invoke(cli, [command, *rest[:1], "-c", config, *rest[1:]], input=stdin)


def ok(config: str, *args: str, stdin: str | None = None) -> Result:
    result = invoke(config, *args, stdin=stdin)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def row(config: str, name: str) -> dict[str, object]:
    engine = create_engine(load_config(config).records.url)
    with engine.connect() as conn:
        found = conn.execute(select(subscribers).where(subscribers.c.name == name)).mappings().one()
    engine.dispose()
    return dict(found)


def database_bytes(tsa: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tsa.glob("records.sqlite3*")))


def test_add_with_a_token_prints_it_once_and_stores_only_its_hash(config: str, tsa: Path) -> None:
    added = ok(config, "subscribers", "add", "acme", "--token", "--ip", "192.0.2.0/24", "--quota", "1000/month")
    lines = added.output.splitlines()
    assert lines[0] == "subscriber acme added"
    token = lines[-1]
    assert re.fullmatch(r"stampd_[A-Za-z0-9_-]{43}", token), added.output
    assert row(config, "acme")["token_sha256"] == hashlib.sha256(token.encode()).digest()
    assert token.encode() not in database_bytes(tsa)
    for args in (("list",), ("list", "--json"), ("show", "acme"), ("show", "acme", "--json")):
        shown = ok(config, "subscribers", *args).output
        assert token not in shown
        assert "acme" in shown
    details = json.loads(ok(config, "subscribers", "show", "acme", "--json").output)
    assert details == {
        "name": "acme",
        "enabled": True,
        "networks": ["192.0.2.0/24"],
        "token": True,
        "basic_user": None,
        "certificates": [],
        "quotas": ["1000/month"],
        "rate_per_s": None,
        "tsus": None,
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
    }


def test_a_second_add_of_a_name_is_an_error(config: str) -> None:
    ok(config, "subscribers", "add", "twice", "--ip", "198.51.100.7")
    again = invoke(config, "subscribers", "add", "twice", "--ip", "198.51.100.8")
    assert again.exit_code == 1
    assert "subscriber twice already exists" in again.output
    assert row(config, "twice")["networks"] == '["198.51.100.7/32"]'  # unchanged
    taken = invoke(config, "subscribers", "add", "other", "--ip", "198.51.100.7/32")
    assert taken.exit_code == 1
    assert "the network 198.51.100.7/32 is already used by subscriber twice" in taken.output


@pytest.mark.parametrize(
    ("args", "option", "message"),
    [
        (("--ip", "10.0.0.1/33"), "--ip", "'10.0.0.1/33'"),
        (("--ip", "10.0.0.1/8"), "--ip", "has host bits set"),
        (("--ip", "10.0.0.0/8", "--quota", "10/week"), "--quota", "unknown quota period 'week'"),
        (("--ip", "10.0.0.0/8", "--quota", "1/day", "--quota", "2/day"), "--quota", "at most one quota per period"),
        (("--ip", "10.0.0.0/8", "--rate", "fast"), "--rate", "expected N/s"),
        (("--quota", "1/day"), None, "how is it identified?"),
        (("--ip", "10.0.0.0/8", "--tsu", "default", "--tsu", "defualt"), "--tsu", "defualt: no such TSU in"),
    ],
)
def test_invalid_options_are_named(config: str, args: tuple[str, ...], option: str | None, message: str) -> None:
    refused = invoke(config, "subscribers", "add", "bad", *args)
    assert refused.exit_code == 2
    assert message in refused.output
    if option is not None:
        assert f"'{option}'" in refused.output or option in refused.output
    assert invoke(config, "subscribers", "show", "bad").exit_code == 1  # nothing was added


def test_basic_credentials_from_a_file_and_from_the_prompt(config: str, tsa: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    ok(config, "subscribers", "add", "filed", "--basic-user", "filed-user", "--password-file", str(password_file))
    stored = row(config, "filed")["basic_hash"]
    assert isinstance(stored, str)
    assert stored.startswith("scrypt$")
    assert verify_password(PASSWORD, stored)
    assert PASSWORD.encode() not in database_bytes(tsa)
    shown = ok(config, "subscribers", "show", "filed").output
    assert "filed-user" in shown
    assert stored not in shown  # not even the slow hash is printed
    prompted = ok(config, "subscribers", "add", "prompted", "--basic-user", "p", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert PASSWORD not in prompted.output
    assert verify_password(PASSWORD, str(row(config, "prompted")["basic_hash"]))
    short = invoke(config, "subscribers", "add", "short", "--basic-user", "s", stdin="short\nshort\n")
    assert short.exit_code == 2
    assert "at least 12 characters" in short.output
    password_file.write_bytes(b"\xff" + PASSWORD.encode())
    binary = invoke(config, "subscribers", "add", "binary", "--basic-user", "b", "--password-file", str(password_file))
    assert binary.exit_code == 2
    assert "not readable UTF-8 text" in binary.output
    assert "--password-file" in binary.output
    assert invoke(config, "subscribers", "show", "binary").exit_code == 1


def _certificate(path: Path) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.public_bytes(serialization.Encoding.DER)


def test_client_certificates_and_tsus(config: str, tmp_path: Path) -> None:
    der = _certificate(tmp_path / "client.pem")
    ok(config, "subscribers", "add", "certified", "--cert", str(tmp_path / "client.pem"), "--tsu", "default")
    details = json.loads(ok(config, "subscribers", "show", "certified", "--json").output)
    assert details["certificates"] == [hashlib.sha256(der).hexdigest()]
    assert details["tsus"] == ["default"]
    assert "tsus:         default\n" in ok(config, "subscribers", "show", "certified").output
    ok(config, "subscribers", "add", "anywhere", "--ip", "203.0.113.9")
    assert "tsus:         all\n" in ok(config, "subscribers", "show", "anywhere").output
    assert json.loads(ok(config, "subscribers", "show", "anywhere", "--json").output)["tsus"] is None
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    refused = invoke(config, "subscribers", "add", "junk", "--cert", str(tmp_path / "junk.pem"))
    assert refused.exit_code == 2
    assert "--cert" in refused.output


def test_disable_enable_list_and_the_events(config: str) -> None:
    ok(config, "subscribers", "add", "toggled", "--ip", "2001:db8:7::/48", "--rate", "5/s", "--quota", "9/total")
    assert ok(config, "subscribers", "disable", "toggled").output == "subscriber toggled disabled\n"
    assert ok(config, "subscribers", "disable", "toggled").output == "subscriber toggled was already disabled\n"
    listed = {s["name"]: s for s in json.loads(ok(config, "subscribers", "list", "--json").output)}
    assert listed["toggled"]["enabled"] is False
    assert listed["toggled"]["quotas"] == ["9/total"]
    assert listed["toggled"]["rate_per_s"] == 5
    text = ok(config, "subscribers", "list").output
    assert "toggled  DISABLED  2001:db8:7::/48  9/total, 5/s  all TSUs" in text
    assert ok(config, "subscribers", "enable", "toggled").output == "subscriber toggled enabled\n"
    missing = invoke(config, "subscribers", "enable", "nobody")
    assert (missing.exit_code, missing.output) == (1, "no subscriber nobody\n")
    store = RecordStore(load_config(config).records.url, create=False)
    events = [(e["kind"], e["detail"]["name"]) for e in store.events() if e["kind"].startswith("subscriber.")]
    store.close()
    assert events[-3:] == [
        ("subscriber.added", "toggled"),
        ("subscriber.disabled", "toggled"),
        ("subscriber.enabled", "toggled"),
    ]
    audit = ok(config, "audit", "verify")
    assert "Audit: OK" in audit.output


def test_usage_report(config: str) -> None:
    start = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp()) * 1_000_000
    hour = 3600 * 1_000_000
    rows = [
        {
            "serial": format(0xABC000 + i, "x"),
            "gen_time": "20261101000000Z",
            "gen_time_us": start + i * hour,
            "tsu": "default",
            "policy": "1.2.3",
            "hash_oid": "2.16.840.1.101.3.4.2.1",
            "imprint": bytes(32),
            "token": b"\x30\x00",
            "subscriber": "billed" if i < 3 else None,
        }
        for i in range(4)
    ]
    engine = create_engine(load_config(config).records.url)
    with engine.begin() as conn:
        conn.execute(insert(tokens), rows)
    engine.dispose()
    csv_report = ok(config, "usage", "report", "--from", "2026-11-01", "--to", "2026-12-01", "--subscriber", "billed")
    assert csv_report.output == (
        "subscriber,tsu,tokens,first,last\nbilled,default,3,2026-11-01T00:00:00+00:00,2026-11-01T02:00:00+00:00\n"
    )
    json_report = ok(
        config, "usage", "report", "--from", "2026-11-01T01:00:00Z", "--to", "2026-11-02", "--format", "json"
    )
    assert [r for r in json.loads(json_report.output) if r["subscriber"] == "billed"] == [
        {
            "subscriber": "billed",
            "tsu": "default",
            "tokens": 2,
            "first": "2026-11-01T01:00:00+00:00",
            "last": "2026-11-01T02:00:00+00:00",
        }
    ]
    backwards = invoke(config, "usage", "report", "--from", "2026-12-01", "--to", "2026-11-01")
    assert backwards.exit_code == 2
    assert "--to" in backwards.output
    bad = invoke(config, "usage", "report", "--from", "yesterday", "--to", "2026-11-01")
    assert bad.exit_code == 2
    assert "--from" in bad.output


def events_of(config: str, name: str) -> list[dict[str, object]]:
    store = RecordStore(load_config(config).records.url, create=False)
    found = [e for e in store.events() if e["kind"].startswith("subscriber.") and e["detail"]["name"] == name]
    store.close()
    return found


def test_update_changes_only_what_is_given_and_records_what_changed(config: str, tsa: Path) -> None:
    """SPEC issue 6 (subscribers): `update` replaces the lists it is given, keeps the rest, and records a chained
    `subscriber.updated` event naming the changed fields, with no secret and no hash of one."""
    added = ok(config, "subscribers", "add", "upd", "--token", "--ip", "192.0.2.64/26", "--quota", "10/day")
    token_hash = row(config, "upd")["token_sha256"]
    changed = ok(
        config, "subscribers", "update", "upd", "--ip", "2001:db8:64::/48", "--ip", "198.51.100.64/26",
        "--quota", "5/hour", "--quota", "100/month", "--rate", "3/s", "--tsu", "default",
    )  # fmt: skip
    assert changed.output == "subscriber upd updated: networks, quotas, rate_per_s, tsus\n"
    details = json.loads(ok(config, "subscribers", "show", "upd", "--json").output)
    assert details["networks"] == ["2001:db8:64::/48", "198.51.100.64/26"]
    assert details["quotas"] == ["5/hour", "100/month"]
    assert (details["rate_per_s"], details["tsus"]) == (3, ["default"])
    assert row(config, "upd")["token_sha256"] == token_hash  # not given: kept
    assert added.output.splitlines()[-1] not in changed.output
    again = ok(config, "subscribers", "update", "upd", "--quota", "100/month", "--quota", "5/hour", "--all-tsus")
    assert again.output == "subscriber upd updated: tsus\n"  # the same quotas in another order change nothing
    assert ok(config, "subscribers", "update", "upd", "--all-tsus").output == "subscriber upd unchanged\n"
    removed = ok(config, "subscribers", "update", "upd", "--no-quota", "--no-rate")
    assert removed.output == "subscriber upd updated: quotas, rate_per_s\n"
    details = json.loads(ok(config, "subscribers", "show", "upd", "--json").output)
    assert (details["quotas"], details["rate_per_s"], details["tsus"]) == ([], None, None)
    updates = [e for e in events_of(config, "upd") if e["kind"] == "subscriber.updated"]
    assert [e["detail"] for e in updates] == [
        {
            "name": "upd",
            "changed": ["networks", "quotas", "rate_per_s", "tsus"],
            "networks": ["2001:db8:64::/48", "198.51.100.64/26"],
            "quotas": ["5/hour", "100/month"],
            "rate_per_s": 3,
            "tsus": ["default"],
        },
        {"name": "upd", "changed": ["tsus"], "tsus": None},  # the unchanged update recorded nothing
        {"name": "upd", "changed": ["quotas", "rate_per_s"], "quotas": [], "rate_per_s": None},
    ]
    assert "Audit: OK" in ok(config, "audit", "verify").output


def test_update_token_prints_a_new_one_once_and_the_old_one_stops_working(config: str, tsa: Path) -> None:
    """SPEC issue 6 (subscribers): a new API token replaces the old one; only its hash is stored, the event says
    only that there is a token."""
    old = ok(config, "subscribers", "add", "rotated", "--token").output.splitlines()[-1]
    updated = ok(config, "subscribers", "update", "rotated", "--token")
    lines = updated.output.splitlines()
    assert lines[0] == "subscriber rotated updated: token"
    new = lines[-1]
    assert re.fullmatch(r"stampd_[A-Za-z0-9_-]{43}", new) and new != old
    assert row(config, "rotated")["token_sha256"] == hashlib.sha256(new.encode()).digest()
    assert new.encode() not in database_bytes(tsa)
    store = SubscriberStore(load_config(config).records.url)
    directory = store.load_directory()
    store.close()
    found = directory.identify(Credentials(bearer=new))
    assert found is not None and found.name == "rotated"
    with pytest.raises(Unauthorized, match="unknown API token"):
        directory.identify(Credentials(bearer=old))
    event = events_of(config, "rotated")[-1]
    assert event["detail"] == {"name": "rotated", "changed": ["token"], "token": True}
    assert hashlib.sha256(new.encode()).hexdigest() not in json.dumps(event)
    ok(config, "subscribers", "update", "rotated", "--no-token", "--ip", "203.0.113.200")
    assert row(config, "rotated")["token_sha256"] is None
    assert events_of(config, "rotated")[-1]["detail"] == {
        "name": "rotated",
        "changed": ["networks", "token"],
        "networks": ["203.0.113.200/32"],
        "token": False,
    }


def test_update_basic_credentials(config: str, tsa: Path, tmp_path: Path) -> None:
    """SPEC issue 6 (subscribers): a new basic user and password, a new password for the same user, removal; the
    password and its hash never appear in an event."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text(PASSWORD + "\n")
    second.write_text("another long basic password\n")
    ok(config, "subscribers", "add", "basic", "--ip", "203.0.113.201")
    ok(config, "subscribers", "update", "basic", "--basic-user", "basic-1", "--password-file", str(first))
    assert row(config, "basic")["basic_user"] == "basic-1"
    assert verify_password(PASSWORD, str(row(config, "basic")["basic_hash"]))
    renewed = ok(config, "subscribers", "update", "basic", "--password-file", str(second))
    assert renewed.output == "subscriber basic updated: basic\n"
    stored = row(config, "basic")
    assert stored["basic_user"] == "basic-1"  # the same user, a new password
    assert verify_password("another long basic password", str(stored["basic_hash"]))
    assert not verify_password(PASSWORD, str(stored["basic_hash"]))
    typed = f"{PASSWORD}\n{PASSWORD}\n"
    prompted = ok(config, "subscribers", "update", "basic", "--basic-user", "basic-2", stdin=typed)
    assert PASSWORD not in prompted.output
    assert row(config, "basic")["basic_user"] == "basic-2"
    ok(config, "subscribers", "update", "basic", "--no-basic")
    assert (row(config, "basic")["basic_user"], row(config, "basic")["basic_hash"]) == (None, None)
    updates = [e["detail"] for e in events_of(config, "basic") if e["kind"] == "subscriber.updated"]
    assert [u["basic_user"] for u in updates] == ["basic-1", "basic-1", "basic-2", None]
    assert all(u["changed"] == ["basic"] for u in updates)
    assert "scrypt" not in json.dumps(updates) and PASSWORD not in json.dumps(updates)
    lone = invoke(config, "subscribers", "update", "basic", "--password-file", str(first))
    assert lone.exit_code == 2
    assert "has no basic user: give --basic-user" in lone.output
    assert "Audit: OK" in ok(config, "audit", "verify").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ip", "10.9.0.0/16", "--no-ip"), "--ip and --no-ip contradict each other"),
        (("--token", "--no-token"), "--token and --no-token contradict each other"),
        (("--basic-user", "u", "--no-basic"), "--basic-user and --no-basic contradict each other"),
        (("--quota", "1/day", "--no-quota"), "--quota and --no-quota contradict each other"),
        (("--rate", "1/s", "--no-rate"), "--rate and --no-rate contradict each other"),
        (("--tsu", "default", "--all-tsus"), "--tsu and --all-tsus contradict each other"),
        ((), "nothing to change"),
        (("--quota", "1/fortnight"), "unknown quota period 'fortnight'"),
        (("--tsu", "defualt"), "defualt: no such TSU in"),
        (("--basic-user", "a:b"), "has no ':'"),
    ],
)
def test_update_refuses_contradictions_and_bad_values(config: str, args: tuple[str, ...], message: str) -> None:
    """SPEC issue 6 (subscribers): a refused update names the options and changes nothing."""
    if invoke(config, "subscribers", "show", "steady").exit_code != 0:
        ok(config, "subscribers", "add", "steady", "--ip", "10.8.0.0/16", "--quota", "7/day")
    before = row(config, "steady")
    refused = invoke(config, "subscribers", "update", "steady", *args)
    assert refused.exit_code == 2, refused.output
    assert message in refused.output
    assert row(config, "steady") == before


def test_update_refuses_identifiers_of_others_and_leaving_none(config: str, tmp_path: Path) -> None:
    """SPEC issue 6 (subscribers): the same identifier rules as `add`, and a subscriber keeps some identifier."""
    _certificate(tmp_path / "owned.pem")
    ok(config, "subscribers", "add", "owner", "--ip", "10.20.0.0/16", "--basic-user", "owner-user",
       "--password-file", str(_password_file(tmp_path)), "--cert", str(tmp_path / "owned.pem"))  # fmt: skip
    ok(config, "subscribers", "add", "claimant", "--ip", "10.21.0.0/16")
    before = row(config, "claimant")
    for args, message in [
        (("--ip", "10.20.0.0/16"), "the network 10.20.0.0/16 is already used by subscriber owner"),
        (("--basic-user", "owner-user", "--password-file", str(_password_file(tmp_path))), "the basic user"),
        (("--cert", str(tmp_path / "owned.pem")), "the certificate with SHA-256"),
        (("--no-ip",), "subscriber claimant would have no identifier left"),
    ]:
        refused = invoke(config, "subscribers", "update", "claimant", *args)
        assert refused.exit_code == 1, refused.output
        assert message in refused.output
        assert row(config, "claimant") == before
    assert not [e for e in events_of(config, "claimant") if e["kind"] == "subscriber.updated"]
    missing = invoke(config, "subscribers", "update", "nobody", "--no-rate")
    assert (missing.exit_code, missing.output) == (1, "no subscriber nobody\n")


def _password_file(directory: Path) -> Path:
    path = directory / "password"
    path.write_text(PASSWORD + "\n")
    return path
