"""`stampd subscribers`: the contracted clients in the records, how each is identified and what it may use
(issue 6). Running servers pick the changes up within 5 seconds (each re-reads the subscribers), or at once on
`stampd reload`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import sys
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.access import (
    SALT_BYTES,
    Network,
    Quota,
    Subscriber,
    cert_sha256,
    hash_password,
    hash_token,
    parse_rate,
)
from stampd.cli.options import config_option
from stampd.config import Config, load_config
from stampd.errors import RecordingError
from stampd.records.migrate import current_revision, head_revision
from stampd.records.subscribers import SubscriberStore, described

TOKEN_PREFIX = "stampd_"
NAME_MAX = 64


def new_token() -> str:
    """A new API token: ``stampd_`` and 256 random bits in URL-safe base64 (43 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def open_store(config: Config) -> SubscriberStore:
    """The subscribers of the TSA configured in ``config``, refusing a records schema that is not this
    stampd's (the subscribers table comes with revision 0003)."""
    url = config.records.url
    actual, expected = current_revision(url), head_revision()
    if actual != expected:
        raise RecordingError(
            f"the records schema is at {actual or 'empty'}, this stampd needs {expected}: "
            f"run `stampd db upgrade -c {config.source}`"
        )
    return SubscriberStore(url)


@click.group("subscribers")
def command() -> None:
    """Manage the subscribers: who may use the TSUs with access = "subscribers", and how much."""


def _name(text: str) -> str:
    if not text or len(text) > NAME_MAX or not all(c.isascii() and (c.isalnum() or c in "-_.@") for c in text):
        raise click.BadParameter(f"expected 1 to {NAME_MAX} characters of A-Z a-z 0-9 - _ . @", param_hint="NAME")
    return text


def _networks(values: Sequence[str]) -> tuple[Network, ...]:
    networks: list[Network] = []
    for value in values:
        try:
            network = ip_network(value)
        except ValueError as e:
            raise click.BadParameter(f"{value!r}: {e}", param_hint="--ip") from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _quotas(values: Sequence[str]) -> tuple[Quota, ...]:
    quotas = []
    for value in values:
        try:
            quotas.append(Quota.parse(value))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--quota") from None
    periods = [q.period for q in quotas]
    if len(set(periods)) != len(periods):
        raise click.BadParameter(
            "give at most one quota per period (e.g. one per month and one total)", param_hint="--quota"
        )
    return tuple(quotas)


def _rate(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rate") from None


def _certificates(paths: Sequence[Path]) -> tuple[bytes, ...]:
    fingerprints: list[bytes] = []
    for path in paths:
        try:
            data = path.read_bytes()
            cert = (
                x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
            )
        except (OSError, ValueError) as e:
            raise click.BadParameter(
                f"{path}: not a readable PEM or DER certificate: {e}", param_hint="--cert"
            ) from None
        fingerprint = cert_sha256(cert.public_bytes(Encoding.DER))
        if fingerprint not in fingerprints:
            fingerprints.append(fingerprint)
    return tuple(fingerprints)


def _password(user: str | None, password_file: Path | None) -> str | None:
    """The basic password of ``user`` (None without one): see :func:`_new_password`."""
    if user is None:
        if password_file is not None:
            raise click.BadParameter("--password-file needs --basic-user", param_hint="--password-file")
        return None
    return _new_password(user, password_file)


def _new_password(user: str, password_file: Path | None) -> str:
    """A basic password: from --password-file (its first line), else asked for twice on the terminal; never from
    the command line, where other users and the shell history would see it."""
    if password_file is not None:
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(
                f"{password_file}: not readable UTF-8 text: {e}", param_hint="--password-file"
            ) from None
        password = lines[0] if lines else ""
    else:
        password = click.prompt(f"password for {user}", hide_input=True, confirmation_prompt=True, err=True)
    if len(password) < 12:
        raise click.BadParameter("the password must have at least 12 characters", param_hint="--password-file")
    return password


def _basic_user(user: str | None) -> str | None:
    if user is not None and (not user or ":" in user):
        raise click.BadParameter("a basic user name is not empty and has no ':'", param_hint="--basic-user")
    return user


def _known_tsus(config: Config, tsus: Sequence[str]) -> frozenset[str]:
    unknown = sorted(set(tsus) - {tsu.name for tsu in config.tsus})
    if unknown:
        # A misspelt TSU would restrict the subscriber to a TSU that does not exist: 403 on every request.
        raise click.BadParameter(f"{', '.join(unknown)}: no such TSU in {config.source}", param_hint="--tsu")
    return frozenset(tsus)


@command.command("add")
@config_option
@click.argument("name")
@click.option("--ip", "ips", multiple=True, metavar="CIDR", help="An address or network that identifies it (repeat).")
@click.option("--token", "with_token", is_flag=True, help="Generate an API token (Authorization: Bearer), shown once.")
@click.option("--basic-user", metavar="USER", help="HTTP basic user; the password is asked for, or --password-file.")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File whose first line is the basic password (instead of the prompt).",
)
@click.option(
    "--cert",
    "certs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A client certificate (PEM or DER) that identifies it (repeat).",
)
@click.option("--quota", "quotas", multiple=True, metavar="N/PERIOD", help="hour, day, month or total (repeat).")
@click.option("--rate", metavar="N/s", help="At most N requests per second.")
@click.option("--tsu", "tsus", multiple=True, metavar="NAME", help="Restrict it to this TSU (repeat); default: all.")
def add(
    *,
    config_file: str,
    name: str,
    ips: tuple[str, ...],
    with_token: bool,
    basic_user: str | None,
    password_file: Path | None,
    certs: tuple[Path, ...],
    quotas: tuple[str, ...],
    rate: str | None,
    tsus: tuple[str, ...],
) -> None:
    """Add subscriber NAME, identified by any of addresses (--ip), an API token (--token), basic credentials
    (--basic-user) or client certificates (--cert). The token is printed once; only its hash is stored."""
    name = _name(name)
    if not (ips or with_token or basic_user or certs):
        raise click.UsageError("give at least one of --ip, --token, --basic-user or --cert: how is it identified?")
    basic_user = _basic_user(basic_user)
    networks, quota_list, rate_per_s = _networks(ips), _quotas(quotas), _rate(rate)
    config = load_config(config_file)
    allowed_tsus = _known_tsus(config, tsus)
    fingerprints = _certificates(certs)
    password = _password(basic_user, password_file)
    token = new_token() if with_token else None
    subscriber = Subscriber(
        name=name,
        enabled=True,
        networks=networks,
        token_sha256=None if token is None else hash_token(token),
        basic_user=basic_user,
        basic_hash=None if password is None else hash_password(password, os.urandom(SALT_BYTES)),
        cert_sha256=fingerprints,
        quotas=quota_list,
        rate_per_s=rate_per_s,
        tsus=allowed_tsus or None,
    )
    store = open_store(config)
    try:
        store.add(subscriber)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        store.close()
    click.echo(f"subscriber {name} added")
    if token is not None:
        click.echo("API token (shown only now; stampd keeps only its hash):")
        click.echo(token)


_CONFLICTS = (
    ("ips", "--ip", "no_ip", "--no-ip"),
    ("with_token", "--token", "no_token", "--no-token"),
    ("basic_user", "--basic-user", "no_basic", "--no-basic"),
    ("password_file", "--password-file", "no_basic", "--no-basic"),
    ("certs", "--cert", "no_cert", "--no-cert"),
    ("quotas", "--quota", "no_quota", "--no-quota"),
    ("rate", "--rate", "no_rate", "--no-rate"),
    ("tsus", "--tsu", "all_tsus", "--all-tsus"),
)
"""Options of `update` that contradict each other: (parameter, option, parameter, option)."""


def _refuse_conflicts(given: dict[str, Any]) -> None:
    present = {parameter for parameter, value in given.items() if value not in (None, False, ())}
    for first, first_option, second, second_option in _CONFLICTS:
        if first in present and second in present:
            raise click.UsageError(f"{first_option} and {second_option} contradict each other: give one of them")
    if not present:
        raise click.UsageError("nothing to change: give at least one option (see --help)")


@command.command("update")
@config_option
@click.argument("name")
@click.option("--ip", "ips", multiple=True, metavar="CIDR", help="Replace the addresses and networks (repeat).")
@click.option("--no-ip", is_flag=True, help="Remove every address and network.")
@click.option("--token", "with_token", is_flag=True, help="Generate a new API token, shown once; the old one stops.")
@click.option("--no-token", is_flag=True, help="Remove the API token.")
@click.option("--basic-user", metavar="USER", help="Replace the basic credentials; the password is asked for.")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File whose first line is the new basic password (alone: a new password for the same user).",
)
@click.option("--no-basic", is_flag=True, help="Remove the basic credentials.")
@click.option(
    "--cert",
    "certs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replace the client certificates (PEM or DER; repeat).",
)
@click.option("--no-cert", is_flag=True, help="Remove every client certificate.")
@click.option("--quota", "quotas", multiple=True, metavar="N/PERIOD", help="Replace the quotas (repeat).")
@click.option("--no-quota", is_flag=True, help="Remove every quota.")
@click.option("--rate", metavar="N/s", help="Replace the rate limit.")
@click.option("--no-rate", is_flag=True, help="Remove the rate limit.")
@click.option("--tsu", "tsus", multiple=True, metavar="NAME", help="Restrict it to these TSUs instead (repeat).")
@click.option("--all-tsus", is_flag=True, help="Let it use every TSU that serves subscribers.")
def update_command(*, config_file: str, name: str, **given: Any) -> None:
    """Change subscriber NAME: only what is given, each option replacing that whole list (every --ip, every
    --quota, ...). A quota change applies to the current window's count. Running servers pick it up within
    5 seconds, or at once on `stampd reload`."""
    _refuse_conflicts(given)
    changes: dict[str, Any] = {}
    if given["ips"] or given["no_ip"]:
        changes["networks"] = _networks(given["ips"])
    if given["certs"] or given["no_cert"]:
        changes["cert_sha256"] = _certificates(given["certs"])
    if given["quotas"] or given["no_quota"]:
        changes["quotas"] = _quotas(given["quotas"])
    if given["rate"] is not None or given["no_rate"]:
        changes["rate_per_s"] = _rate(given["rate"])
    if given["no_basic"]:
        changes["basic_user"] = changes["basic_hash"] = None
    basic_user = _basic_user(given["basic_user"])
    config = load_config(config_file)
    if given["tsus"] or given["all_tsus"]:
        changes["tsus"] = _known_tsus(config, given["tsus"]) or None
    store = open_store(config)
    try:
        current = store.get(name)
        if current is None:
            click.echo(f"no subscriber {name}", err=True)
            sys.exit(1)
        if basic_user is not None or given["password_file"] is not None:
            user = basic_user or current.basic_user
            if user is None:
                raise click.BadParameter(
                    f"subscriber {name} has no basic user: give --basic-user", param_hint="--password-file"
                )
            password = _new_password(user, given["password_file"])
            changes["basic_user"] = basic_user  # None: the user at the time of the update keeps it
            changes["basic_hash"] = hash_password(password, os.urandom(SALT_BYTES))
        token = new_token() if given["with_token"] else None
        if token is not None or given["no_token"]:
            changes["token_sha256"] = None if token is None else hash_token(token)
        changed = store.update(name, functools.partial(_changed, changes))
    except KeyError:
        click.echo(f"no subscriber {name}", err=True)
        sys.exit(1)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        store.close()
    if not changed:
        click.echo(f"subscriber {name} unchanged")
        return
    click.echo(f"subscriber {name} updated: {', '.join(changed)}")
    if token is not None:
        click.echo("API token (shown only now; the previous one no longer works; stampd keeps only its hash):")
        click.echo(token)


def _changed(changes: dict[str, Any], current: Subscriber) -> Subscriber:
    """``current`` with ``changes``; new basic credentials without a user name keep the current user (read in the
    update's transaction: ValueError if it has none by then)."""
    if "basic_hash" in changes and changes["basic_hash"] is not None and changes["basic_user"] is None:
        if current.basic_user is None:
            raise ValueError(f"subscriber {current.name} has no basic user any more: give --basic-user")
        changes = {**changes, "basic_user": current.basic_user}
    return dataclasses.replace(current, **changes)


def _text(description: dict[str, Any]) -> list[str]:
    identified = [*description["networks"]]
    if description["token"]:
        identified.append("API token")
    if description["basic_user"]:
        identified.append(f"basic user {description['basic_user']}")
    identified += [f"certificate {f[:16]}..." for f in description["certificates"]]
    limits = [*description["quotas"]]
    if description["rate_per_s"]:
        limits.append(f"{description['rate_per_s']}/s")
    return [
        description["name"],
        "enabled" if description["enabled"] else "DISABLED",
        ", ".join(identified),
        ", ".join(limits) or "unlimited",
        "all TSUs" if description["tsus"] is None else ", ".join(description["tsus"]),
    ]


@command.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_command(config_file: str, as_json: bool) -> None:
    """List the subscribers: state, how each is identified, its limits and its TSUs."""
    store = open_store(load_config(config_file))
    try:
        found = store.list()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([described(s) for s in found], indent=2))
        return
    for subscriber in found:
        click.echo("  ".join(_text(described(subscriber))))


def _details(subscriber: Subscriber) -> dict[str, Any]:
    details = described(subscriber)
    details["token_sha256"] = None if subscriber.token_sha256 is None else subscriber.token_sha256.hex()
    return details


@command.command("show")
@config_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(config_file: str, name: str, as_json: bool) -> None:
    """Show subscriber NAME (never a secret: the token only as its SHA-256); exit status 1 if there is none."""
    store = open_store(load_config(config_file))
    try:
        subscriber = store.get(name)
    finally:
        store.close()
    if subscriber is None:
        click.echo(f"no subscriber {name}", err=True)
        sys.exit(1)
    details = _details(subscriber)
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    if details["tsus"] is None:
        details["tsus"] = "all"  # JSON keeps null; blank text would read as "none"
    for key, value in details.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        click.echo(f"{key + ':':<14}{'' if shown is None else shown}")


def _set_enabled(config_file: str, name: str, enabled: bool) -> None:
    store = open_store(load_config(config_file))
    try:
        changed = store.set_enabled(name, enabled)
    except KeyError:
        click.echo(f"no subscriber {name}", err=True)
        sys.exit(1)
    finally:
        store.close()
    state = "enabled" if enabled else "disabled"
    click.echo(f"subscriber {name} {state}" if changed else f"subscriber {name} was already {state}")


@command.command("disable")
@config_option
@click.argument("name")
def disable(config_file: str, name: str) -> None:
    """Disable subscriber NAME: its requests get 403 within 5 seconds (or at once on `stampd reload`)."""
    _set_enabled(config_file, name, False)


@command.command("enable")
@config_option
@click.argument("name")
def enable(config_file: str, name: str) -> None:
    """Enable subscriber NAME again."""
    _set_enabled(config_file, name, True)
