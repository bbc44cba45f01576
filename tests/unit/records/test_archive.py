"""Records archives (issue "Evidence that scales", item 4): `stampd records export` writes one ZIP that
`stampd records verify-archive` checks offline; any altered, dropped or added item is found and named
(SPEC OPS-08, OPS-09, OPS-11)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from stampd.app import create_app
from stampd.cli.main import cli
from stampd.config import load_config
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.records.archive import ARCHIVE_FORMAT, verify_archive
from stampd.records.checkpoint import load_public_key

TOKENS = 6


def issue(config_path: Path, count: int) -> None:
    """Run the service in-process and issue ``count`` real tokens (recorded, chained, checkpointed at stop)."""
    app = create_app(load_config(config_path))

    async def run() -> None:
        await app._on_startup()
        for i in range(count):
            imprint = hashlib.sha256(f"document {i}".encode()).digest()
            nonce = secrets.randbits(63) if i % 2 else None
            request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, imprint), None, nonce, i % 3 == 0, ())
            assert (await app._units["/"].respond(request, "::1")).granted
        await app._on_shutdown()

    asyncio.run(run())


@pytest.fixture(scope="module")
def tsa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("archive") / "tsa"
    result = CliRunner().invoke(cli, ["init", str(directory), "--key-type", "ed25519"])
    assert result.exit_code == 0, result.output
    config_path = directory / "stampd.toml"
    issue(config_path, TOKENS)
    return config_path


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    error = "" if result.exception is None or isinstance(result.exception, SystemExit) else str(result.exception)
    return result.exit_code, result.output + error


@pytest.fixture(scope="module")
def archive(tsa: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("out") / "records.zip"
    status, output = run("records", "export", "-c", tsa, "--from", "2000-01-01", "--to", "2200-01-01T00:00", target)
    assert status == 0, output
    assert f"{TOKENS} tokens" in output and ", signed" in output
    return target


def rewrite(source: Path, target: Path, change: Callable[[dict[str, bytes]], None], *, reseal: bool) -> Path:
    """A copy of ``source`` with its members changed; with ``reseal`` the manifest's hashes are recomputed and
    the signature and key removed, as a forger without the checkpoint key would have to."""
    with zipfile.ZipFile(source) as z:
        members = {name: z.read(name) for name in z.namelist()}
    change(members)
    if reseal:
        manifest = json.loads(members["manifest.json"])
        members.pop("manifest.sig", None)
        members.pop("checkpoint-key.pem", None)
        manifest["members"].pop("checkpoint-key.pem", None)
        manifest["checkpoint_key_sha256"] = None
        members["checkpoints.jsonl"] = b""
        manifest["counts"]["checkpoints"] = 0
        for name in manifest["members"]:
            manifest["members"][name] = {
                "sha256": hashlib.sha256(members[name]).hexdigest(),
                "size": len(members[name]),
            }
        members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return target


def lines(members: dict[str, bytes], name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in members[name].splitlines()]


def set_lines(members: dict[str, bytes], name: str, rows: list[dict[str, object]]) -> None:
    members[name] = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)


def test_the_archive_has_the_documented_members_and_verifies_ops_11(archive: Path, tsa: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("manifest.json"))
        tokens = lines({"t": z.read("tokens.jsonl")}, "t")
        segments = json.loads(z.read("segments.json"))
    assert names == {
        "manifest.json",
        "manifest.sig",
        "tokens.jsonl",
        "events.jsonl",
        "checkpoints.jsonl",
        "segments.json",
        "checkpoint-key.pem",
        "certs/default/certificate.pem",
        "certs/default/chain-0.pem",
        "certs/default/trust-anchor.pem",
    }
    assert manifest["format"] == ARCHIVE_FORMAT
    assert set(manifest["members"]) == names - {"manifest.json", "manifest.sig"}
    assert manifest["trust_anchors"] == ["certs/default/trust-anchor.pem"]
    assert manifest["counts"]["tokens"] == TOKENS and manifest["counts"]["checkpoints"] >= 1
    assert [t["seq"] for t in tokens] == list(range(1, TOKENS + 1))
    assert {"serial", "token", "imprint", "chain", "seq", "prev_hash", "entry_hash"} <= set(tokens[0])
    assert [(s["table"], s["first_seq"], s["last_seq"]) for s in segments if s["table"] == "tokens"] == [
        ("tokens", 1, TOKENS)
    ]
    assert segments[0]["prev_hash"] == "00" * 32

    report = verify_archive(
        archive, pinned_key=load_public_key((tsa.parent / "pki/checkpoint-public.pem").read_bytes())
    )
    assert report.ok, report.problems
    assert report.manifest_signed and report.checkpoints >= 1
    assert report.signed_entries >= TOKENS  # the stop's checkpoint covers every token
    status, output = run("records", "verify-archive", archive)
    assert status == 0 and "Archive: OK" in output, output


def test_export_never_replaces_a_file_and_checks_its_dates(archive: Path, tsa: Path) -> None:
    before = archive.read_bytes()
    status, output = run("records", "export", "-c", tsa, "--from", "2000-01-01", "--to", "2200-01-01", archive)
    assert status != 0 and "exists" in output
    assert archive.read_bytes() == before
    status, output = run(
        "records", "export", "-c", tsa, "--from", "2030-01-01", "--to", "2020-01-01", archive.with_suffix(".x")
    )
    assert status == 2 and "--to" in output and not archive.with_suffix(".x").exists()
    status, output = run(
        "records", "export", "-c", tsa, "--from", "yesterday", "--to", "2020-01-01", archive.with_suffix(".x")
    )
    assert status == 2 and "--from" in output and "ISO 8601" in output
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # no partial file left behind


def test_a_flipped_byte_in_a_member_is_named(archive: Path, tmp_path: Path) -> None:
    def flip(members: dict[str, bytes]) -> None:
        data = bytearray(members["events.jsonl"])
        data[10] ^= 0x01
        members["events.jsonl"] = bytes(data)

    report = verify_archive(rewrite(archive, tmp_path / "a.zip", flip, reseal=False))
    assert report.problems == ["events.jsonl: its SHA-256 or size is not the manifest's (the member was altered)"]


def test_a_resealed_manifest_fails_its_signature_or_the_pinned_key(archive: Path, tmp_path: Path, tsa: Path) -> None:
    def drop_signature_only(members: dict[str, bytes]) -> None:
        del members["manifest.sig"]

    stripped = verify_archive(rewrite(archive, tmp_path / "a.zip", drop_signature_only, reseal=False))
    assert stripped.problems == ["manifest.sig: the manifest signature or its key is missing"]
    resealed = rewrite(archive, tmp_path / "b.zip", lambda members: None, reseal=True)
    pinned = load_public_key((tsa.parent / "pki/checkpoint-public.pem").read_bytes())
    problems = verify_archive(resealed, pinned_key=pinned).problems
    assert problems == ["manifest.json: not signed by the given checkpoint key (archive key: none)"]


def test_a_dropped_token_is_named(archive: Path, tmp_path: Path) -> None:
    def drop(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        set_lines(members, "tokens.jsonl", rows[:2] + rows[3:])
        manifest = json.loads(members["manifest.json"])
        manifest["counts"]["tokens"] -= 1
        members["manifest.json"] = json.dumps(manifest).encode()

    report = verify_archive(rewrite(archive, tmp_path / "a.zip", drop, reseal=True))
    assert not report.ok
    assert any("segments.json: records tokens chain" in p and "seq 1-6, the rows form" in p for p in report.problems), (
        report.problems
    )


def test_an_edited_row_is_named(archive: Path, tmp_path: Path) -> None:
    def edit(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        rows[4]["requester"] = "192.0.2.1"
        set_lines(members, "tokens.jsonl", rows)

    report = verify_archive(rewrite(archive, tmp_path / "a.zip", edit, reseal=True))
    assert len(report.problems) >= 1
    assert report.problems[0].startswith("tokens.jsonl line 5 (tokens chain ")
    assert " seq 5, serial 0x" in report.problems[0]
    assert report.problems[0].endswith("): edited (its fields no longer hash to its entry hash)")


def test_a_token_swapped_for_another_is_named(archive: Path, tmp_path: Path) -> None:
    """The row and its hash are rewritten consistently, but the token is another row's: its serial and imprint
    no longer match the row."""

    def swap(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        rows[1]["token"] = rows[2]["token"]
        set_lines(members, "tokens.jsonl", rows)

    problems = verify_archive(rewrite(archive, tmp_path / "a.zip", swap, reseal=True)).problems
    assert problems[0].startswith("tokens.jsonl line 2 ")
    assert "the token does not verify (imprint:" in problems[0]
