"""Structured logs: the JSON and text formats of `stampd serve`, the request id on every line logged while a
request is served, and no secret or request body in any log line (issue 6, observability; SPEC OPS-04 wants the
log readable by machines as well as people)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import logging.config
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stampd.app import create_app
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.der.request import encode_request
from stampd.errors import ConfigError
from stampd.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter, log_config, rfc3339_utc
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.server.asgi import TimeStampApp

sys.path.insert(0, str(Path(__file__).parents[1]))

from asgitools import call_app

RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _record(
    message: str = "hello %s", *, exc_info: Any = None, extra: dict[str, Any] | None = None
) -> logging.LogRecord:
    logger = logging.getLogger("stampd.test")
    args = ("world",) if "%s" in message else ()
    record = logger.makeRecord("stampd.test", logging.WARNING, __file__, 1, message, args, exc_info, extra=extra)
    RequestIdFilter().filter(record)
    return record


def test_json_line_has_the_fields_a_collector_needs() -> None:
    token = REQUEST_ID.set("abc-1")
    try:
        record = _record(extra={"tsu": "eu", "serial": 12})
    finally:
        REQUEST_ID.reset(token)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert RFC3339_MS_UTC.match(entry["time"]), entry["time"]
    assert entry["time"] == rfc3339_utc(record.created)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "stampd.test"
    assert entry["message"] == "hello world"
    assert entry["pid"] == os.getpid()
    assert entry["request_id"] == "abc-1"
    assert entry["tsu"] == "eu" and entry["serial"] == 12
    assert "exception" not in entry


def test_json_line_without_a_request_has_no_request_id_and_carries_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "request_id" not in entry
    assert entry["exception"].startswith("Traceback") and "ValueError: boom" in entry["exception"]
    assert entry["message"] == "failed"


def test_rfc3339_time_is_utc_with_milliseconds() -> None:
    assert rfc3339_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_utc(1_800_000_000.1239) == "2027-01-15T08:00:00.123Z"


def test_text_format_names_the_request() -> None:
    token = REQUEST_ID.set("abc-2")
    try:
        text = TextFormatter().format(_record())
    finally:
        REQUEST_ID.reset(token)
    assert re.match(r"^\S+ \S+ WARNING stampd\.test\[\d+\]: hello world \[request abc-2\]$", text), text
    assert "[request" not in TextFormatter().format(_record())


def test_log_config_applies_each_format_and_refuses_others(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(log_config("json"))
        logging.getLogger("stampd.test").warning("as %s", "json")
        logging.config.dictConfig(log_config("text"))
        logging.getLogger("stampd.test").warning("as %s", "text")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    json_line, text_line = capsys.readouterr().err.splitlines()
    assert json.loads(json_line)["message"] == "as json"
    assert text_line.endswith(f"WARNING stampd.test[{os.getpid()}]: as text")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        log_config("xml")


def test_config_log_format_is_checked(tmp_path: Path) -> None:
    config = _demo(tmp_path)
    assert load_config(config).server.log_format == "json"
    text = config.read_text()
    config.write_text(text.replace("[server]\n", '[server]\nlog_format = "text"\n', 1))
    assert load_config(config).server.log_format == "text"
    config.write_text(text.replace("[server]\n", '[server]\nlog_format = "syslog"\n', 1))
    with pytest.raises(ConfigError, match=r"stampd\.toml: server\.log_format: expected 'json' or 'text'"):
        load_config(config)


# --- no secrets in the logs ---


def _demo(tmp_path: Path, *args: str) -> Path:
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "tsa"), *args])
    assert result.exit_code == 0, result.output
    return tmp_path / "tsa" / "stampd.toml"


class _Collect(logging.Handler):
    """Every record, as both formats would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(JsonFormatter().format(record))
        self.lines.append(TextFormatter().format(record))


@pytest.fixture
def collected() -> Iterator[_Collect]:
    handler = _Collect()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def _call(app: TimeStampApp, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    return (await call_app(app, method, path, headers=headers, body=body, client=("192.0.2.7", 40000)))[0]


def test_no_token_password_or_body_is_logged(tmp_path: Path, collected: _Collect) -> None:
    """Requests with a valid and a wrong Bearer token, a valid and a wrong basic password, a malformed
    Authorization header and a malformed body, to a subscribers-only TSU and a public one: every log line stampd
    writes meanwhile (at DEBUG, in both formats) is free of the token, the passwords and the bodies."""
    config = _demo(tmp_path, "--tsu", "open", "--tsu", "closed")
    text = config.read_text().replace("[tsu.closed]\n", '[tsu.closed]\naccess = "subscribers"\n', 1)
    config.write_text(text)
    password = "correct horse " + secrets.token_hex(8)
    wrong_password = "wrong horse " + secrets.token_hex(8)
    password_file = tmp_path / "password"
    password_file.write_text(password + "\n")
    added = CliRunner().invoke(
        cli,
        [
            "subscribers",
            "add",
            "alice",
            "--token",
            "--basic-user",
            "alice",
            "--password-file",
            str(password_file),
            *("-c", str(config)),
        ],
    )
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    wrong_token = secrets.token_urlsafe(32)
    garbage = b"\x30\x03" + secrets.token_bytes(40)
    query = encode_request(
        TimeStampRequest(1, MessageImprint(SHA256.oid, True, secrets.token_bytes(32)), None, 7, True, ())
    )

    def basic(user: str, secret: str) -> bytes:
        return b"Basic " + base64.b64encode(f"{user}:{secret}".encode())

    app = create_app(load_config(config))
    content_type = (b"content-type", b"application/timestamp-query")
    statuses: dict[str, int] = {}

    async def exchange() -> None:
        await app._on_startup()
        try:
            for name, path, authorization, body in (
                ("bearer", "/closed", b"Bearer " + token.encode(), query),
                ("wrong bearer", "/closed", b"Bearer " + wrong_token.encode(), query),
                ("basic", "/closed", basic("alice", password), query),
                ("wrong basic", "/closed", basic("alice", wrong_password), query),
                ("malformed", "/closed", b"Basic " + wrong_password.encode(), query),
                ("garbage body", "/closed", b"Bearer " + token.encode(), garbage),
                ("public with bearer", "/open", b"Bearer " + token.encode(), query),
                ("public garbage", "/open", basic("alice", password), garbage),
            ):
                statuses[name] = await _call(app, "POST", path, [content_type, (b"authorization", authorization)], body)
        finally:
            await app._on_shutdown()

    asyncio.run(exchange())
    assert statuses["bearer"] == statuses["basic"] == statuses["public with bearer"] == 200, statuses
    assert statuses["wrong bearer"] == statuses["wrong basic"] == statuses["malformed"] == 401, statuses
    assert statuses["garbage body"] == statuses["public garbage"] == 400, statuses
    log = "\n".join(collected.lines)
    assert collected.lines, "nothing was logged at all: the capture is broken"
    for secret in (token, wrong_token, password, wrong_password, base64.b64encode(password.encode()).decode()):
        assert secret not in log
    for body in (garbage, query):
        assert body.hex() not in log and repr(body)[2:-1] not in log
    assert "authorization" not in log.lower()


def test_no_log_call_passes_a_secret() -> None:
    """A reviewer's grep, kept: no logging call in src/ names a passphrase, PIN, password, token or the
    Authorization header among its arguments."""
    source = Path(__file__).resolve().parents[2] / "src" / "stampd"
    call = re.compile(r"\blog(?:ger)?\.(?:debug|info|warning|error|exception|critical|log)\((.*?)\)$", re.S | re.M)
    secret_words = re.compile(r"passphrase\b(?!_)|\bpin\b|password\b|\btoken\b(?!s)|authorization|\bbody\b", re.I)
    offending = [
        f"{path.relative_to(source)}: {match.group(0)[:120]}"
        for path in source.rglob("*.py")
        for match in call.finditer(path.read_text())
        if secret_words.search(re.sub(r'"[^"]*"|\'[^\']*\'', "", match.group(1)))
    ]
    assert not offending, offending


def test_the_usage_ledgers_redis_password_is_not_logged(tmp_path: Path, collected: _Collect) -> None:
    """`[access] ledger` may be a Redis URL with a password: start-up names where quotas are counted (the host)
    and never the password (the connection itself is made lazily, at the first reservation)."""
    config = _demo(tmp_path)
    password = "redis-" + secrets.token_hex(8)
    text = config.read_text().replace("qualified = false\n", 'qualified = false\naccess = "subscribers"\n', 1)
    config.write_text(text + f'\n[access]\nledger = "redis://stampd:{password}@127.0.0.1:6379/0"\n')
    app = create_app(load_config(config))
    assert app is not None
    log = "\n".join(collected.lines)
    assert "quotas and rates counted in Redis at 127.0.0.1:6379" in log
    assert password not in log
