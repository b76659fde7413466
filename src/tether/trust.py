"""How clients trust a Tether server: its cluster CA (a file, or fetched at join time and checked
against a pinned hash of its public key, as kubeadm does), never the system's CA store alone."""

from __future__ import annotations

import hashlib
import ssl


def ca_hash(ca_pem: bytes) -> str:
    """`sha256:<hex>` of the CA's public key (SubjectPublicKeyInfo), as kubeadm pins it: a joining
    host compares this with what it was told out of band before it trusts the server. Read from the
    certificate's DER by hand, not with `cryptography`: its import is ~10 MB an agent would carry
    for its whole life after joining (issue 29's 120 MB per agent)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(ca_pem.decode("ascii"))
        tag, at, end = _der(der, 0)  # Certificate ::= SEQUENCE { tbsCertificate, ... }
        if tag != 0x30 or end != len(der):
            raise ValueError("the certificate is not one DER SEQUENCE")
        tag, at, _ = _der(der, at)  # into tbsCertificate
        if tag != 0x30:
            raise ValueError("no tbsCertificate SEQUENCE")
        tag, _, end = _der(der, at)
        if tag == 0xA0:  # [0] version
            at = end
        for _ in range(5):  # serialNumber, signature, issuer, validity, subject
            _, _, at = _der(der, at)
        tag, _, end = _der(der, at)
        if tag != 0x30:
            raise ValueError("no subjectPublicKeyInfo where the certificate should hold it")
        spki = der[at:end]
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"not a PEM X.509 certificate: {e}") from None
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def _der(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at `at`: (tag, where its content starts, where it ends). Strict DER only (a
    one-byte tag, a definite length in its shortest form), as X.509 requires: the pin is compared on
    what this reads, TLS then trusts what OpenSSL reads, and both must read the same structure, so
    BER forms another parser could read differently (indefinite lengths) are refused."""
    tag, n = der[at], der[at + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("a multi-byte DER tag")
    at += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4:
            raise ValueError("an indefinite or oversized DER length")
        n = int.from_bytes(der[at:at + k], "big")
        if n < 0x80 or der[at] == 0:
            raise ValueError("a DER length not in its shortest form")
        at += k
    if at + n > len(der):
        raise ValueError("a DER element runs past the end")
    return tag, at, at + n


def client_context(ca_file: str | None = None, ca_pem: bytes | None = None) -> ssl.SSLContext:
    """Verify the server against the cluster CA when one is given (the usual case: the CA is the
    cluster's own), else against the system store (operator-supplied certificates from a public CA)."""
    if not (ca_file or ca_pem):
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check and verification on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        if ca_pem:
            ctx.load_verify_locations(cadata=ca_pem.decode())
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the CA {ca_file or 'given'}: {e}; pass the server's ca.crt (in its state "
                         "dir) with --ca-file") from None
    return ctx
