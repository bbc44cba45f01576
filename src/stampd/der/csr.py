"""PKCS#10 certification requests for a TSU key (RFC 2986), built as DER so that any signer can sign them.

The request info is assembled here and signed by the caller through its signer (a key file or an HSM), then
put together with :func:`certification_request`. It asks for the extensions of the TSU profile: extendedKeyUsage
id-kp-timeStamping alone, critical (RFC 3161 §2.3, SPEC CRT-01), and keyUsage digitalSignature, critical
(SPEC CRT-03), in a PKCS#9 extensionRequest attribute (RFC 2985 §5.4.2).
"""

from __future__ import annotations

from asn1crypto import algos, core, csr, keys, x509

from stampd.errors import PKIError


def _tsu_extensions() -> x509.Extensions:
    """The extensions a TSU certificate must carry (SPEC CRT-01, CRT-03)."""
    key_usage = x509.Extension(
        {"extn_id": "key_usage", "critical": True, "extn_value": x509.KeyUsage({"digital_signature"})}
    )
    eku = x509.Extension(
        {"extn_id": "extended_key_usage", "critical": True, "extn_value": x509.ExtKeyUsageSyntax(["time_stamping"])}
    )
    return x509.Extensions([key_usage, eku])


def certification_request_info(*, subject: bytes, public_key_info: bytes) -> bytes:
    """DER CertificationRequestInfo (RFC 2986 §4.1) for the DER ``subject`` Name and SubjectPublicKeyInfo."""
    try:
        name = x509.Name.load(subject, strict=True)
        spki = keys.PublicKeyInfo.load(public_key_info, strict=True)
        name.native  # noqa: B018 - decode now, so that a malformed name is refused here
        spki["algorithm"].native  # noqa: B018
    except ValueError as e:
        raise PKIError(f"cannot build a certification request: {e}") from e
    info = csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": name,
            "subject_pk_info": spki,
            "attributes": csr.CRIAttributes(
                [csr.CRIAttribute({"type": "extension_request", "values": [_tsu_extensions()]})]
            ),
        }
    )
    return bytes(info.dump())


def certification_request(info: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """DER CertificationRequest (RFC 2986 §4.2): ``info`` with its signature and the AlgorithmIdentifier used."""
    try:
        request_info = csr.CertificationRequestInfo.load(info, strict=True)
        algorithm = algos.SignedDigestAlgorithm.load(signature_algorithm, strict=True)
        algorithm.native  # noqa: B018
    except ValueError as e:
        raise PKIError(f"cannot assemble the certification request: {e}") from e
    request = csr.CertificationRequest(
        {
            "certification_request_info": request_info,
            "signature_algorithm": algorithm,
            "signature": core.OctetBitString(signature),
        }
    )
    return bytes(request.dump())
