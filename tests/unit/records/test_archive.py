"""Records archives (issue "Evidence that scales", item 4): `stampd records export` writes one ZIP that
`stampd records verify-archive` checks offline; any altered, dropped or added item is found and named
(SPEC OPS-08, OPS-09, OPS-11)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import shutil
import sqlite3
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519

from stampd.app import create_app
from stampd.cli.main import cli
from stampd.cli.options import parse_instant
from stampd.cli.records import checkpoint_key
from stampd.config import load_config
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.records.archive import ARCHIVE_FORMAT, verify_archive
from stampd.records.chain import token_entry_hash
from stampd.records.checkpoint import CheckpointSigner, load_public_key, signed_bytes
from stampd.records.retention import CheckpointKey

TOKENS = 6
FIRST_RUN = 4
"""Tokens of the first of two service runs: each run is a chain of its own (4 tokens, then 2)."""


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
    issue(config_path, FIRST_RUN)
    issue(config_path, TOKENS - FIRST_RUN)
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


def rewrite(
    source: Path,
    target: Path,
    change: Callable[[dict[str, bytes]], None],
    *,
    reseal: bool,
    sign_with: CheckpointKey | None = None,
) -> Path:
    """A copy of ``source`` with its members changed; with ``reseal`` the manifest's hashes are recomputed and
    the signature and key removed, as a forger without the checkpoint key would have to; with ``sign_with`` the
    hashes are recomputed and the manifest signed with that key (as its exporter would)."""
    with zipfile.ZipFile(source) as z:
        members = {name: z.read(name) for name in z.namelist()}
    change(members)
    if sign_with is not None:
        manifest = json.loads(members["manifest.json"])
        for name in manifest["members"]:
            manifest["members"][name] = {
                "sha256": hashlib.sha256(members[name]).hexdigest(),
                "size": len(members[name]),
            }
        members["manifest.json"] = json.dumps(manifest).encode()
        members["manifest.sig"] = sign_with.signer.sign(members["manifest.json"])
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


def lines_of(archive: Path, name: str) -> list[dict[str, Any]]:
    with zipfile.ZipFile(archive) as z:
        return lines({name: z.read(name)}, name)


def lines(members: dict[str, bytes], name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in members[name].splitlines()]


def set_lines(members: dict[str, bytes], name: str, rows: list[dict[str, Any]]) -> None:
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
    assert sorted(t["seq"] for t in tokens) == [1, 1, 2, 2, 3, 4]
    assert [(t["chain"], t["seq"]) for t in tokens] == sorted((t["chain"], t["seq"]) for t in tokens)
    assert {"serial", "token", "imprint", "chain", "seq", "prev_hash", "entry_hash"} <= set(tokens[0])
    assert sorted((s["first_seq"], s["last_seq"]) for s in segments if s["table"] == "tokens") == [
        (1, TOKENS - FIRST_RUN),
        (1, FIRST_RUN),
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
    missing = archive.parent / "missing" / "x.zip"
    status, output = run("records", "export", "-c", tsa, "--from", "2000-01-01", "--to", "2200-01-01", missing)
    assert status == 1 and f"cannot write the archive {missing}: No such file or directory" in output


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
        set_lines(members, "tokens.jsonl", [r for r in rows if r["seq"] != 3])
        manifest = json.loads(members["manifest.json"])
        manifest["counts"]["tokens"] -= 1
        members["manifest.json"] = json.dumps(manifest).encode()

    report = verify_archive(rewrite(archive, tmp_path / "a.zip", drop, reseal=True))
    assert not report.ok
    assert any(
        "segments.json: records tokens chain" in p and f"seq 1-{FIRST_RUN}, the rows form" in p for p in report.problems
    ), report.problems


def test_an_edited_row_is_named(archive: Path, tmp_path: Path) -> None:
    def edit(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        rows[4]["requester"] = "192.0.2.1"
        set_lines(members, "tokens.jsonl", rows)

    report = verify_archive(rewrite(archive, tmp_path / "a.zip", edit, reseal=True))
    assert len(report.problems) >= 1
    assert report.problems[0].startswith("tokens.jsonl line 5 (tokens chain ")
    assert f" seq {lines_of(archive, 'tokens.jsonl')[4]['seq']}, serial 0x" in report.problems[0]
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


def tsa_key(tsa: Path) -> CheckpointKey:
    key = checkpoint_key(load_config(tsa).records)
    assert key is not None
    return key


def rechain(rows: list[dict[str, Any]], chain: str) -> None:
    """Recompute the entry hashes of one chain's rows from the first on, as a forger who edited a row would."""
    prev = None
    for row in rows:
        if row["chain"] != chain:
            continue
        if prev is not None:
            row["prev_hash"] = prev
        fields = {k: bytes.fromhex(v) if k in ("imprint", "token") else v for k, v in row.items()}
        fields["prev_hash"] = bytes.fromhex(row["prev_hash"])
        prev = row["entry_hash"] = token_entry_hash(fields["prev_hash"], chain, row["seq"], fields).hex()


def segments_of(rows: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """segments.json as the rows form them (what a forger would write)."""
    found: list[dict[str, Any]] = []
    for row in rows:
        last = found[-1] if found else None
        if last is not None and last["chain"] == row["chain"] and last["last_seq"] + 1 == row["seq"]:
            last.update(last_seq=row["seq"], entry_hash=row["entry_hash"])
        else:
            found.append(
                {
                    "table": table,
                    "chain": row["chain"],
                    "first_seq": row["seq"],
                    "prev_hash": row["prev_hash"],
                    "last_seq": row["seq"],
                    "entry_hash": row["entry_hash"],
                }
            )
    return found


def set_segments(members: dict[str, bytes], tokens: list[dict[str, Any]]) -> None:
    events = [s for s in json.loads(members["segments.json"]) if s["table"] == "events"]
    members["segments.json"] = json.dumps(segments_of(tokens, "tokens") + events).encode()


def test_reordered_rows_are_named(archive: Path, tmp_path: Path) -> None:
    """Rows must come in (chain, seq) order: two rows swapped, or two chains swapped with segments.json rewritten
    to match, are refused even with every hash recomputed."""

    def swap_rows(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        rows[1], rows[2] = rows[2], rows[1]
        set_lines(members, "tokens.jsonl", rows)

    problems = verify_archive(rewrite(archive, tmp_path / "a.zip", swap_rows, reseal=True)).problems
    assert problems[0].startswith("tokens.jsonl line 3 (")
    assert "out of order or duplicated (after tokens chain" in problems[0]

    def swap_chains(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        first = [r for r in rows if r["chain"] == rows[0]["chain"]]
        rows = rows[len(first) :] + first
        set_lines(members, "tokens.jsonl", rows)
        set_segments(members, rows)

    problems = verify_archive(rewrite(archive, tmp_path / "b.zip", swap_chains, reseal=True)).problems
    assert "out of order or duplicated" in problems[0], problems
    signed = verify_archive(rewrite(archive, tmp_path / "c.zip", swap_rows, reseal=False)).problems
    assert signed == ["tokens.jsonl: its SHA-256 or size is not the manifest's (the member was altered)"]


def test_a_dropped_event_is_named(archive: Path, tmp_path: Path, tsa: Path) -> None:
    def drop_event(members: dict[str, bytes]) -> None:
        rows = lines(members, "events.jsonl")
        set_lines(members, "events.jsonl", [r for r in rows if (r["chain"], r["seq"]) != (rows[0]["chain"], 2)])
        manifest = json.loads(members["manifest.json"])
        manifest["counts"]["events"] = len(rows) - 1
        members["manifest.json"] = json.dumps(manifest).encode()

    signed = verify_archive(rewrite(archive, tmp_path / "a.zip", drop_event, reseal=False)).problems
    assert signed[0] == "manifest.sig: the signature over manifest.json does not verify (edited or forged)"
    forged = verify_archive(rewrite(archive, tmp_path / "b.zip", drop_event, reseal=True)).problems
    assert len(forged) == 1 and forged[0].startswith("segments.json: records events chain "), forged
    assert forged[0].endswith("seq 1-2, the rows form events chain " + forged[0].split()[4] + " seq 1-1")
    pinned = verify_archive(tmp_path / "b.zip", pinned_key=tsa_key(tsa).public_key).problems
    assert pinned == ["manifest.json: not signed by the given checkpoint key (archive key: none)"]


def test_a_token_replaced_by_another_valid_token_of_the_same_tsu_is_named(archive: Path, tmp_path: Path) -> None:
    """The forger puts another real token of the same TSU in a row, makes the row's imprint and nonce agree with
    it and recomputes the chain and its segments: the token's serial and genTime still betray it."""

    def replace(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        victim, donor = rows[1], rows[0]
        victim.update(token=donor["token"], imprint=donor["imprint"], nonce=donor["nonce"])
        rechain(rows, victim["chain"])
        set_lines(members, "tokens.jsonl", rows)
        set_segments(members, rows)

    problems = verify_archive(rewrite(archive, tmp_path / "a.zip", replace, reseal=True)).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("tokens.jsonl line 2 (")
    assert problems[0].endswith("the token's serial, genTime differ from its row")


def test_a_checkpoint_of_another_key_is_left_out_of_an_export_and_refused_in_an_archive(
    tsa: Path, archive: Path, tmp_path: Path
) -> None:
    """A checkpoint key rotated: the records hold checkpoints of the old key, which an archive signed with the new
    one cannot vouch for. Export leaves them out; a checkpoint line of another key in an archive is refused."""
    other = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    copy = tmp_path / "tsa"
    shutil.copytree(tsa.parent, copy)
    heads = {"tokens": {}, "events": {}}
    foreign = CheckpointSigner(other)
    with sqlite3.connect(copy / "records.sqlite3") as conn:
        for chain, seq, entry in conn.execute("SELECT chain, seq, entry_hash FROM tokens WHERE seq = 1"):
            heads["tokens"][chain] = [seq, entry.hex()]
        conn.execute(
            "INSERT INTO checkpoints (at_us, heads, signature, signer) VALUES (?, ?, ?, ?)",
            (1, json.dumps(heads), foreign.sign(signed_bytes(1, heads)), foreign.key_id),
        )
    conn.close()
    target = tmp_path / "rotated.zip"
    status, output = run(
        "records", "export", "-c", copy / "stampd.toml", "--from", "2000-01-01", "--to", "2200-01-01", target
    )
    assert status == 0, output
    report = verify_archive(target)
    assert report.ok, report.problems
    assert foreign.key_id not in lines_of(target, "checkpoints.jsonl").__repr__()

    def add_foreign(members: dict[str, bytes]) -> None:
        rows = lines(members, "checkpoints.jsonl")
        signature = foreign.sign(signed_bytes(1, heads))
        rows.append(
            {"id": 999, "at_us": 1, "heads": json.dumps(heads), "signature": signature.hex(), "signer": foreign.key_id}
        )
        set_lines(members, "checkpoints.jsonl", rows)

    problems = verify_archive(
        rewrite(archive, tmp_path / "a.zip", add_foreign, reseal=False, sign_with=tsa_key(tsa))
    ).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"checkpoints.jsonl line {len(lines_of(archive, 'checkpoints.jsonl')) + 1} (checkpoint 999)"
    )
    assert f"signed by another key (SPKI SHA-256 {foreign.key_id})" in problems[0]

    status, output = run("records", "verify-archive", archive, "--public-key", tsa.parent / "pki/checkpoint-public.pem")
    assert status == 0, output


def test_a_member_added_twice_added_or_removed_is_named(archive: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        members = {name: z.read(name) for name in z.namelist()}
    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        altered = lines(members, "tokens.jsonl")
        altered[0]["requester"] = "192.0.2.66"
        z.writestr("tokens.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in altered))
        for name, data in members.items():  # the genuine copy last: what Python's zipfile would read
            z.writestr(name, data)
    assert verify_archive(twice).problems == ["tokens.jsonl: appears twice in the archive"]

    def add(members: dict[str, bytes]) -> None:
        members["certs/default/extra.pem"] = members["certs/default/trust-anchor.pem"]

    added = verify_archive(rewrite(archive, tmp_path / "a.zip", add, reseal=False)).problems
    assert added == ["certs/default/extra.pem: a member the manifest does not list"]

    def remove(members: dict[str, bytes]) -> None:
        del members["certs/default/chain-0.pem"]

    removed = verify_archive(rewrite(archive, tmp_path / "b.zip", remove, reseal=False)).problems
    assert removed == ["certs/default/chain-0.pem: listed in the manifest but missing from the archive"]


MALFORMED_MANIFESTS: list[tuple[str, object]] = [
    ("members", []),
    ("members", {"tokens.jsonl": "x"}),
    ("from_us", "abc"),
    ("counts", [1]),
    ("trust_anchors", "certs/default/trust-anchor.pem"),
    ("checkpoint_key_sha256", 5),
]


def test_a_corrupt_or_malformed_archive_is_refused_without_a_traceback(archive: Path, tmp_path: Path) -> None:
    """Every byte of the file flipped in turn (a stride of them), malformed manifests and rows from a forger:
    always a report naming the problem, never an exception."""
    data = archive.read_bytes()
    damaged = tmp_path / "damaged.zip"
    offsets = range(0, len(data), max(1, len(data) // 400))
    refused = 0
    for offset in offsets:
        flipped = bytearray(data)
        flipped[offset] ^= 0x55
        damaged.write_bytes(bytes(flipped))
        refused += not verify_archive(damaged).ok  # never raises
    assert refused > 0.9 * len(offsets)  # the rest are bytes no reader uses (a local header's copy of a size)
    for field_name, value in MALFORMED_MANIFESTS:

        def malform(members: dict[str, bytes], field_name: str = field_name, value: object = value) -> None:
            manifest = json.loads(members["manifest.json"])
            manifest[field_name] = value
            members["manifest.json"] = json.dumps(manifest).encode()

        problems = verify_archive(rewrite(archive, tmp_path / "m.zip", malform, reseal=False)).problems
        assert problems == [f"manifest.json: {field_name} is missing or not of the expected type"], problems

    def bad_rows(members: dict[str, bytes]) -> None:
        rows = lines(members, "tokens.jsonl")
        rows[0]["token"] = "zz"
        rows[1]["nonce"] = "abc"
        set_lines(members, "tokens.jsonl", rows)
        members["checkpoints.jsonl"] = b'{"id": 1, "heads": "[1]", "at_us": 1, "signature": "00", "signer": null}\n'
        members["segments.json"] = b"[1]"
        members["events.jsonl"] = b"\xff\n"

    problems = verify_archive(rewrite(archive, tmp_path / "r.zip", bad_rows, reseal=True)).problems
    assert "tokens.jsonl line 1: a binary column is not hexadecimal" in problems
    assert any(p.startswith("tokens.jsonl line 2 (") and "not a readable token" in p for p in problems), problems
    assert "events.jsonl line 1: not JSON" in problems and "segments.json: not a list of segments" in problems

    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("not an archive")
    status, output = run("records", "verify-archive", not_zip)
    assert status == 1 and "not a readable archive" in output and "Archive: FAILED" in output
    assert run("records", "verify-archive", tmp_path / "missing.zip")[0] == 2
    assert run("records", "verify-archive", tmp_path)[0] == 2


def test_export_dates_are_iso_8601_in_utc_unless_zoned(tsa: Path, tmp_path: Path) -> None:
    midnight = parse_instant("2026-01-01", "--from")
    assert midnight == parse_instant("2026-01-01T00:00:00", "--from") == parse_instant("2026-01-01T00:00Z", "--from")
    assert midnight == parse_instant("2026-01-01Z", "--from") == parse_instant("2026-01-01T00:00z", "--from")
    assert parse_instant("2026-01-01T01:00:00+01:00", "--from") == midnight == 1_767_225_600_000_000
    for bad in ("0001-01-01T00:00+01:00", "1969-12-31", "2026-13-01", "next week"):
        with pytest.raises(click.BadParameter):
            parse_instant(bad, "--from")
    status, output = run(
        "records", "export", "-c", tsa, "--from", "2026-01-01T01:00+01:00", "--to", "2026-01-01", tmp_path / "x.zip"
    )
    assert status == 2
    assert "--to: 2026-01-01T00:00:00+00:00 is not after --from 2026-01-01T00:00:00+00:00" in output
    status, output = run(
        "records", "export", "-c", tsa, "--from", "0001-01-01T00:00+01:00", "--to", "2026-01-01", tmp_path / "x.zip"
    )
    assert status == 2 and "outside 1970-01-01 to 9999-01-01" in output
