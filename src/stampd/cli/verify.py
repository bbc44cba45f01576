"""`stampd verify`: check a time-stamp reply or token for a file or digest against trust anchors."""

from __future__ import annotations

import json
from pathlib import Path

import click
from cryptography import x509

from stampd.errors import VerificationError
from stampd.verify import Outcome, VerificationReport, verify_timestamp

_MARKS = {Outcome.OK: "ok", Outcome.FAILED: "FAILED", Outcome.SKIPPED: "skipped"}


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, or the one certificate of a DER file."""
    blob = path.read_bytes()
    try:
        if b"-----BEGIN" in blob:
            return x509.load_pem_x509_certificates(blob)
        return [x509.load_der_x509_certificate(blob)]
    except ValueError as e:
        raise VerificationError(f"{path}: no readable certificate: {e}") from e


def echo_report(report: VerificationReport) -> None:
    """One line per step, then what the token says and the verdict."""
    for check in report.checks:
        click.echo(f"  [{_MARKS[check.outcome]:>7}] {check.name}: {check.detail}")
        for warning in check.warnings:
            click.echo(f"            warning: {warning}")
    click.echo(f"TSU:     {report.tsu or 'unknown'}")
    click.echo(f"genTime: {report.gen_time.isoformat() if report.gen_time else 'unknown'}")
    click.echo(f"serial:  {report.serial if report.serial is not None else 'unknown'}")
    click.echo(f"policy:  {report.policy or 'unknown'}")
    click.echo("Verification: OK" if report.ok else "Verification: FAILED")


def _nonce(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError as e:
        raise click.BadParameter("a decimal or 0x-prefixed integer") from e


@click.command("verify")
@click.argument("tsr", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The time-stamped file.")
@click.option("--digest", "digest_hex", help="Hex digest of the data, with the token's hash algorithm.")
@click.option(
    "--ca", "ca", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Trust anchors."
)
@click.option(
    "--certs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Extra certificates: the TSU certificate if not embedded, intermediates.",
)
@click.option("--policy", help="Require this TSA policy OID.")
@click.option("--nonce", callback=_nonce, help="Require this nonce.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.pass_context
def command(
    ctx: click.Context,
    *,
    tsr: Path,
    data: Path | None,
    digest_hex: str | None,
    ca: Path,
    certs: Path | None,
    policy: str | None,
    nonce: int | None,
    as_json: bool,
) -> None:
    """Verify the time-stamp reply or token TSR (RFC 3161); exit 1 when any check fails."""
    if (data is None) == (digest_hex is None):
        raise click.UsageError("give exactly one of --data and --digest")
    digest = None
    if digest_hex is not None:
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError as e:
            raise click.BadParameter("not hexadecimal", param_hint="--digest") from e
    report = verify_timestamp(
        tsr.read_bytes(),
        digest=digest,
        data=data.read_bytes() if data is not None else None,
        anchors=load_certificates(ca),
        extra_certs=load_certificates(certs) if certs is not None else [],
        policy=policy,
        nonce=nonce,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        echo_report(report)
    if not report.ok:
        ctx.exit(1)
