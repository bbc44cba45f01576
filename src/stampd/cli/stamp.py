"""`stampd stamp`: time-stamp a file at a TSA over HTTP and keep the reply as a .tsr file (RFC 3161 §3.4)."""

from __future__ import annotations

from pathlib import Path

import click

from stampd.cli.verify import echo_report, load_certificates
from stampd.client import build_request, check_reply, hash_file, post_request, random_nonce
from stampd.verify import verify_timestamp


@click.command("stamp")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", required=True, help="The TSA's HTTP(S) URL.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: FILE.tsr.")
@click.option("--hash", "hash_name", type=click.Choice(["sha256", "sha384", "sha512"]), default="sha256")
@click.option("--policy", help="Request this TSA policy OID.")
@click.option(
    "--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Verify the reply with these anchors."
)
@click.pass_context
def command(
    ctx: click.Context,
    *,
    file: Path,
    url: str,
    output: Path | None,
    hash_name: str,
    policy: str | None,
    ca: Path | None,
) -> None:
    """Request a time-stamp for FILE with a random nonce and certReq, check the reply echoes the request, and
    write the DER TimeStampResp (RFC 3161 §3.2-3.4)."""
    digest = hash_file(file, hash_name)
    nonce = random_nonce()
    request, body = build_request(digest, hash_name, nonce, cert_req=True, policy=policy)
    reply = post_request(url, body)
    decoded = check_reply(request, reply)
    target = output or file.with_name(file.name + ".tsr")
    target.write_bytes(reply)
    tst = decoded.token.tst_info if decoded.token else None
    click.echo(f"wrote {target}" + (f": serial {tst.serial}, genTime {tst.gen_time.isoformat()}" if tst else ""))
    if ca is not None:
        report = verify_timestamp(reply, digest=digest, anchors=load_certificates(ca), policy=policy, nonce=nonce)
        echo_report(report)
        if not report.ok:
            ctx.exit(1)
