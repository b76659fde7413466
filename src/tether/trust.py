"""How clients trust a Tether server: its cluster CA (a file, or fetched at join time and checked
against a pinned hash of its public key, as kubeadm does), never the system's CA store alone."""

from __future__ import annotations

import hashlib
import ssl


def ca_hash(ca_pem: bytes) -> str:
    """`sha256:<hex>` of the CA's public key (SubjectPublicKeyInfo), as kubeadm pins it: a joining
    host compares this with what it was told out of band before it trusts the server."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_pem_x509_certificate(ca_pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


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
