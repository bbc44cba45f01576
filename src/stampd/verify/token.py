"""Relying-party verification of a time-stamp token, as numbered steps that follow RFC 3161 §2.4.2,
RFC 5652 §5.4 and RFC 5035 §5.4, in the manner of trailofbits/rfc3161-client and sigstore-python.

Every step records a result; a step that needs something an earlier one could not provide is skipped, and the
report is ``ok`` only when every required step passed. The signer is found by its SignerIdentifier, never by
position in the certificate list (SPEC INT-04), and the chain is validated at genTime, not now (SPEC INT-11).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.certprofile import profile_problems
from stampd.der.token_reader import (
    SignerInfo,
    TimeStampToken,
    describe_name,
    is_bare_token,
    names_equal,
    read_object_identifier,
    read_octet_string,
    read_response,
    read_signing_certificate,
    read_token,
)
from stampd.errors import ParseError, VerificationError
from stampd.oids import HASH_BY_OID, SHA1, Attributes, ContentTypes
from stampd.verify.chain import validate_chain
from stampd.verify.report import ALL_CHECKS, Check, CheckResult, Outcome, VerificationReport
from stampd.verify.signature import check_signature, hash_data

_STATUS_NAMES = {0: "granted", 1: "grantedWithMods", 2: "rejection", 3: "waiting", 4: "revocationWarning"}


def verify_timestamp(
    response_or_token: bytes,
    *,
    digest: bytes | None = None,
    data: bytes | None = None,
    anchors: Sequence[x509.Certificate],
    extra_certs: Sequence[x509.Certificate] = (),
    policy: str | None = None,
    nonce: int | None = None,
) -> VerificationReport:
    """Verify a DER TimeStampResp or bare token for ``data`` (or its ``digest``) against ``anchors``.

    ``extra_certs`` supplies certificates the token does not embed (the TSU certificate when certReq was false,
    intermediates). Raises :class:`VerificationError` only when checking is impossible: the bytes are not a
    reply or token, or neither or both of ``data`` and ``digest`` are given.
    """
    if (digest is None) == (data is None):
        raise VerificationError("give either the time-stamped data or its digest, not both or neither")
    run = _Run(anchors=list(anchors), extra_certs=list(extra_certs))
    token = run.step1_parse(response_or_token)
    if token is not None:
        run.step2_structure(token)
        signer = token.signer_infos[0] if len(token.signer_infos) == 1 else None
        cert = run.step3_signer(token, signer)
        run.step4_content_type(signer)
        run.step5_message_digest(token, signer)
        run.step6_signature(signer, cert)
        run.step7_signing_certificate(signer, cert)
        run.step8_chain(token, cert)
        run.step9_tsu_profile(token, cert)
        run.step10_tsa_name(token, cert)
        run.step11_imprint(token, digest, data)
        run.step12_policy(token, policy)
        run.step13_nonce(token, nonce)
    tst = token.tst_info if token is not None else None
    return VerificationReport(
        checks=tuple(run.results),
        tsu=run.cert.subject.rfc4514_string() if run.cert is not None else None,
        serial=tst.serial if tst else None,
        gen_time=tst.gen_time if tst else None,
        policy=tst.policy if tst else None,
        nonce=tst.nonce if tst else None,
    )


@dataclass
class _Run:
    """The state of one verification: inputs, results so far, and the signer certificate once found."""

    anchors: list[x509.Certificate]
    extra_certs: list[x509.Certificate]
    results: list[CheckResult] = field(default_factory=list)
    cert: x509.Certificate | None = None
    embedded: list[x509.Certificate] = field(default_factory=list)

    def ok(self, name: str, detail: str, warnings: Sequence[str] = ()) -> None:
        self.results.append(CheckResult(name, Outcome.OK, detail, tuple(warnings)))

    def fail(self, name: str, detail: str, warnings: Sequence[str] = ()) -> None:
        self.results.append(CheckResult(name, Outcome.FAILED, detail, tuple(warnings)))

    def skip(self, name: str, detail: str) -> None:
        self.results.append(CheckResult(name, Outcome.SKIPPED, detail))

    def skip_all(self, names: Sequence[str], detail: str) -> None:
        for name in names:
            self.skip(name, detail)

    # 1. The reply: status granted and a token present (RFC 3161 §2.4.2, SPEC STS-01).
    def step1_parse(self, blob: bytes) -> TimeStampToken | None:
        try:
            if is_bare_token(blob):
                token = read_token(blob)
                self.skip(Check.STATUS, "a bare token: no PKIStatusInfo to check")
                return token
            response = read_response(blob)
        except ParseError as e:
            raise VerificationError(f"not a time-stamp reply or token: {e}") from e
        status = response.status
        label = _STATUS_NAMES.get(status.status, str(status.status))
        if status.status in (0, 1) and response.token is not None:
            self.ok(Check.STATUS, label)
            return response.token
        extra = "; ".join(status.status_strings)
        bits = f" failInfo bits {list(status.fail_bits)}" if status.fail_bits else ""
        reason = "granted but no token" if status.status in (0, 1) else f"{label}{bits}"
        self.fail(Check.STATUS, f"{reason}{': ' + extra if extra else ''}")
        self.skip_all(list(_ALL_TOKEN_STEPS), "no token")
        return None

    # 2. ContentInfo(SignedData) encapsulating TSTInfo v1, one SignerInfo (RFC 3161 §2.4.2, RFC 5652 §5).
    def step2_structure(self, token: TimeStampToken) -> None:
        problems = []
        warnings = []
        if token.tst_info.version != 1:
            problems.append(f"TSTInfo version {token.tst_info.version}, not 1 (SPEC TST-01)")
        if len(token.signer_infos) != 1:
            problems.append(f"{len(token.signer_infos)} SignerInfos, not exactly one (SPEC CMS-04)")
        if token.signed_data_version not in (3, 4, 5):
            problems.append(f"SignedData version {token.signed_data_version} (RFC 5652 §5.1 wants 3)")
        elif token.signed_data_version != 3:
            warnings.append(f"SignedData version {token.signed_data_version}; some verifiers accept only 3")
        for si in token.signer_infos:
            expected = 1 if si.sid.issuer is not None else 3
            if si.version != expected:
                problems.append(f"SignerInfo version {si.version} with this sid, not {expected} (SPEC CMS-05)")
            if si.digest_algorithm not in token.digest_algorithms:
                warnings.append("digestAlgorithms does not list the signer's digest algorithm (SPEC CMS-06)")
        if token.tst_info.serial <= 0:
            warnings.append(f"serialNumber {token.tst_info.serial} is not positive (SPEC TST-05)")
        if token.other_certificate_choices:
            warnings.append(f"{token.other_certificate_choices} non-X.509 certificates skipped (SPEC INT-12)")
        for der in token.certificates:
            try:
                self.embedded.append(x509.load_der_x509_certificate(der))
            except ValueError as e:
                warnings.append(f"an embedded certificate cannot be decoded and is ignored: {e}")
        if problems:
            self.fail(Check.STRUCTURE, "; ".join(problems), warnings)
        else:
            self.ok(Check.STRUCTURE, "ContentInfo(SignedData) with TSTInfo v1 and one SignerInfo", warnings)

    # 3. The signer certificate, by issuerAndSerialNumber or subjectKeyIdentifier (RFC 5652 §5.3, SPEC INT-04).
    def step3_signer(self, token: TimeStampToken, signer: SignerInfo | None) -> x509.Certificate | None:
        if signer is None:
            self.skip(Check.SIGNER, "no single SignerInfo")
            return None
        pool = {_der(c): c for c in [*self.embedded, *self.extra_certs, *self.anchors]}
        sid = signer.sid
        if sid.issuer is not None:
            wanted = f"issuer {describe_name(sid.issuer)}, serial {sid.serial}"
            matches = [
                c for c in pool.values() if c.serial_number == sid.serial and names_equal(sid.issuer, _issuer_der(c))
            ]
        else:
            wanted = f"subjectKeyIdentifier {(sid.subject_key_identifier or b'').hex()}"
            matches = [c for c in pool.values() if _ski(c) == sid.subject_key_identifier]
        if not matches:
            where = "embedded or supplied" if token.certificates else "supplied (the token embeds none)"
            self.fail(Check.SIGNER, f"no {where} certificate matches the signer ({wanted})")
            return None
        if len(matches) > 1:
            self.fail(Check.SIGNER, f"{len(matches)} different certificates match the signer ({wanted})")
            return None
        self.cert = matches[0]
        self.ok(Check.SIGNER, f"{self.cert.subject.rfc4514_string()} ({wanted})")
        return self.cert

    # 4. content-type attribute = id-ct-TSTInfo, once, single-valued (RFC 5652 §11.1, SPEC CMS-08).
    def step4_content_type(self, signer: SignerInfo | None) -> None:
        if signer is None:
            self.skip(Check.CONTENT_TYPE, "no single SignerInfo")
            return
        value = _single(signer, Attributes.CONTENT_TYPE)
        if isinstance(value, str):
            self.fail(Check.CONTENT_TYPE, value)
            return
        try:
            oid = read_object_identifier(value)
        except ParseError as e:
            self.fail(Check.CONTENT_TYPE, str(e))
            return
        if oid != ContentTypes.TST_INFO:
            self.fail(Check.CONTENT_TYPE, f"content-type {oid}, not id-ct-TSTInfo")
        else:
            self.ok(Check.CONTENT_TYPE, "id-ct-TSTInfo")

    # 5. message-digest attribute = hash of the eContent octets (RFC 5652 §5.4, §11.2, SPEC CMS-08).
    def step5_message_digest(self, token: TimeStampToken, signer: SignerInfo | None) -> None:
        if signer is None:
            self.skip(Check.MESSAGE_DIGEST, "no single SignerInfo")
            return
        value = _single(signer, Attributes.MESSAGE_DIGEST)
        if isinstance(value, str):
            self.fail(Check.MESSAGE_DIGEST, value)
            return
        expected = hash_data(signer.digest_algorithm, token.econtent)
        if expected is None:
            self.fail(Check.MESSAGE_DIGEST, f"unsupported digestAlgorithm {signer.digest_algorithm}")
            return
        try:
            found = read_octet_string(value)
        except ParseError as e:
            self.fail(Check.MESSAGE_DIGEST, str(e))
            return
        if hmac.compare_digest(found, expected):
            self.ok(Check.MESSAGE_DIGEST, f"{_hash_name(signer.digest_algorithm)} of the TSTInfo matches")
        else:
            self.fail(Check.MESSAGE_DIGEST, "message-digest differs from the hash of the eContent (TSTInfo)")

    # 6. The signature over the DER signedAttrs SET with the signer's key (RFC 5652 §5.4, SPEC CMS-09).
    def step6_signature(self, signer: SignerInfo | None, cert: x509.Certificate | None) -> None:
        if signer is None or cert is None:
            self.skip(Check.SIGNATURE, "no signer certificate")
            return
        ok, detail = check_signature(cert, signer)
        (self.ok if ok else self.fail)(Check.SIGNATURE, detail)

    # 7. ESS signing-certificate(-v2) names the signer certificate (RFC 5035 §5.4, RFC 5816 §2.2.1, SPEC ESS-*).
    def step7_signing_certificate(self, signer: SignerInfo | None, cert: x509.Certificate | None) -> None:
        if signer is None or cert is None:
            self.skip(Check.SIGNING_CERTIFICATE, "no signer certificate")
            return
        problems: list[str] = []
        warnings: list[str] = []
        checked = []
        for oid, v2 in ((Attributes.SIGNING_CERTIFICATE_V2, True), (Attributes.SIGNING_CERTIFICATE, False)):
            if not signer.attribute_values(oid):
                continue
            label = "SigningCertificateV2" if v2 else "SigningCertificate"
            checked.append(label)
            value = _single(signer, oid)
            if isinstance(value, str):
                problems.append(value)
                continue
            problems.extend(_ess_problems(label, value, v2, cert, warnings))
        if not checked:
            self.fail(Check.SIGNING_CERTIFICATE, "neither SigningCertificate nor SigningCertificateV2 (ESS-01)")
        elif problems:
            self.fail(Check.SIGNING_CERTIFICATE, "; ".join(problems), warnings)
        else:
            self.ok(Check.SIGNING_CERTIFICATE, f"{' and '.join(checked)}: ESSCertID names the signer", warnings)

    # 8. The chain from the signer to a trust anchor, at genTime (RFC 3161 §4, SPEC INT-11).
    def step8_chain(self, token: TimeStampToken, cert: x509.Certificate | None) -> None:
        if cert is None:
            self.skip(Check.CHAIN, "no signer certificate")
            return
        at = token.tst_info.gen_time
        result = validate_chain(cert, intermediates=[*self.embedded, *self.extra_certs], anchors=self.anchors, at=at)
        if result.ok:
            names = " <- ".join(c.subject.rfc4514_string() for c in result.path)
            self.ok(Check.CHAIN, f"valid at genTime {at.isoformat()}: {names}")
        else:
            self.fail(Check.CHAIN, f"at genTime {at.isoformat()}: " + "; ".join(result.problems))

    # 9. The TSU certificate profile at genTime (RFC 3161 §2.3, SPEC CRT-01..06).
    def step9_tsu_profile(self, token: TimeStampToken, cert: x509.Certificate | None) -> None:
        """Failures are the MUSTs (critical EKU timeStamping alone, validity, privateKeyUsagePeriod, a keyUsage
        that forbids signing); the SHOULDs (critical keyUsage, no CA, C and O in the subject) are warnings, since
        real TSU certificates miss them."""
        if cert is None:
            self.skip(Check.TSU_PROFILE, "no signer certificate")
            return
        problems = profile_problems(cert, token.tst_info.gen_time)
        fatal = [str(p) for p in problems if p.fatal]
        warnings = [str(p) for p in problems if not p.fatal]
        if fatal:
            self.fail(Check.TSU_PROFILE, "; ".join(fatal), warnings)
        else:
            self.ok(Check.TSU_PROFILE, "critical extendedKeyUsage id-kp-timeStamping only", warnings)

    # 10. tsa, when present, names the signer (RFC 3161 §2.4.2, SPEC TST-06).
    def step10_tsa_name(self, token: TimeStampToken, cert: x509.Certificate | None) -> None:
        tst = token.tst_info
        if tst.tsa is None:
            self.skip(Check.TSA_NAME, "no tsa field")
        elif cert is None:
            self.skip(Check.TSA_NAME, "no signer certificate")
        elif tst.tsa_directory_name is None:
            self.skip(Check.TSA_NAME, "tsa is not a directoryName; not compared")
        elif names_equal(tst.tsa_directory_name, cert.subject.public_bytes()):
            self.ok(Check.TSA_NAME, "tsa equals the signer's subject")
        else:
            self.fail(Check.TSA_NAME, f"tsa {describe_name(tst.tsa_directory_name)} is not the signer's subject")

    # 11. messageImprint = the hash of the data (RFC 3161 §2.4.2).
    def step11_imprint(self, token: TimeStampToken, given: bytes | None, data: bytes | None) -> None:
        tst = token.tst_info
        name = _hash_name(tst.hash_oid)
        if data is not None:
            given = hash_data(tst.hash_oid, data)
            if given is None:
                self.fail(Check.IMPRINT, f"the token's imprint hash {tst.hash_oid} is not supported")
                return
        if given is not None and hmac.compare_digest(given, tst.digest):
            self.ok(Check.IMPRINT, f"{name} {tst.digest.hex()}")
        else:
            self.fail(Check.IMPRINT, f"token imprint {name} {tst.digest.hex()} is not the data's")

    # 12. policy, when the caller requires one (RFC 3161 §2.4.2).
    def step12_policy(self, token: TimeStampToken, policy: str | None) -> None:
        got = token.tst_info.policy
        if policy is None:
            self.skip(Check.POLICY, f"not required (token policy {got})")
        elif got == policy:
            self.ok(Check.POLICY, got)
        else:
            self.fail(Check.POLICY, f"token policy {got}, required {policy}")

    # 13. nonce, when the caller sent one (RFC 3161 §2.4.2, SPEC REQ-08).
    def step13_nonce(self, token: TimeStampToken, nonce: int | None) -> None:
        got = token.tst_info.nonce
        if nonce is None:
            self.skip(Check.NONCE, "not required")
        elif got == nonce:
            self.ok(Check.NONCE, str(got))
        else:
            self.fail(Check.NONCE, f"token nonce {got}, expected {nonce}")


_ALL_TOKEN_STEPS = ALL_CHECKS[ALL_CHECKS.index(Check.STATUS) + 1 :]
"""The steps that need a token: all after the status."""


def _ess_problems(label: str, value: bytes, v2: bool, cert: x509.Certificate, warnings: list[str]) -> list[str]:
    """ESSCertID(v2) #1 is the signer: certHash over its whole DER, issuerSerial its issuer and serial."""
    try:
        ids = read_signing_certificate(value, v2=v2)
    except ParseError as e:
        return [f"{label}: {e}"]
    if not ids:
        return [f"{label} lists no certificate"]
    if len(ids) > 1:
        warnings.append(f"{label} lists {len(ids)} certificates; only the first is the signer's (SPEC ESS-07)")
    first = ids[0]
    if first.hash_oid == SHA1.oid and v2:
        warnings.append("SigningCertificateV2 with SHA-1 (SPEC ESS-02)")
    elif not v2:
        warnings.append("SigningCertificate v1 relies on SHA-1 (SPEC ESS-02, INT-10)")
    expected = hash_data(first.hash_oid, _der(cert))
    problems = []
    if expected is None:
        problems.append(f"{label}: unsupported hash {first.hash_oid}")
    elif not hmac.compare_digest(expected, first.cert_hash):
        problems.append(f"{label}: certHash is not the hash of the signer certificate (SPEC ESS-03)")
    if first.issuer_names is not None:
        if first.serial != cert.serial_number:
            problems.append(f"{label}: issuerSerial serial {first.serial} is not the signer's (SPEC ESS-04)")
        if not any(names_equal(n, _issuer_der(cert)) for n in first.issuer_names):
            problems.append(f"{label}: issuerSerial issuer is not the signer's issuer (SPEC ESS-04)")
        if first.other_issuer_names:
            warnings.append(f"{label}: issuerSerial holds names other than a directoryName (SPEC ESS-04)")
    return problems


def _single(signer: SignerInfo, oid: str) -> bytes | str:
    """The one value of the one attribute ``oid``, or a sentence saying why there is not exactly one."""
    found = signer.attribute_values(oid)
    if len(found) != 1:
        return f"{len(found)} attributes {oid}, expected exactly one (RFC 5652 §11, SPEC ESS-06)"
    if len(found[0]) != 1:
        return f"attribute {oid} has {len(found[0])} values, expected one"
    return found[0][0]


def _hash_name(oid: str) -> str:
    known = HASH_BY_OID.get(oid)
    return known.name.upper() if known else oid


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _issuer_der(cert: x509.Certificate) -> bytes:
    return cert.issuer.public_bytes()


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):
        return None
