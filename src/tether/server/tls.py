"""The server's TLS material: a private CA and a server certificate made at first start in the
state dir (or files the operator supplies), and the SSL context the TCP listeners serve with.

Made with the `cryptography` library (ECDSA P-256, SHA-256). The CA lives 10 years and signs only
this cluster's server certificates; a server certificate lives 1 year and is re-issued at start when
it is near its end or does not cover an address or name the server now serves (its SANs).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import time
from dataclasses import dataclass

from tether.trust import ca_hash

log = logging.getLogger("tether.server")
CA_DAYS, CERT_DAYS, RENEW_DAYS = 3650, 365, 30


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str | None  # the CA clients verify with (None: operator files without a CA bundle)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _write_public(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(path + ".tmp", 0o644)
    os.replace(path + ".tmp", path)


def default_sans(listen: list[str], extra: list[str]) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) a server certificate must cover: loopback, this machine's name, every
    specific TCP listen address, and the operator's --tls-san values."""
    names, ips = {"localhost", socket.gethostname()}, {"127.0.0.1", "::1"}
    for addr in listen:
        if addr.startswith(("unix://", "fd://")):
            continue
        host = addr.split("://", 1)[-1].rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            ips |= machine_addresses()
            if not extra:
                log.warning("--listen %s: the certificate covers this machine's name and the addresses it resolves "
                            "to; add --tls-san NAME_OR_IP for every other name hosts use to reach this server", addr)
        else:
            ips.add(host) if _is_ip(host) else names.add(host)
    for san in extra:
        ips.add(san) if _is_ip(san) else names.add(san)
    return names, ips


def machine_addresses() -> set[str]:
    """The addresses this machine's name resolves to (a wildcard listener serves them all)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {str(ipaddress.ip_address(i[4][0].split("%")[0])) for i in infos}


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _covers(cert_pem: bytes, names: set[str], ips: set[str]) -> bool:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.not_valid_after_utc - datetime.timedelta(days=RENEW_DAYS) < datetime.datetime.now(datetime.UTC):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_names = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    return names <= have_names and {str(ipaddress.ip_address(i)) for i in ips} <= have_ips


def _issued_by(cert_path: str, ca_pem: bytes) -> bool:
    """The certificate was signed by this CA (not by one made before it was replaced)."""
    from cryptography import x509

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature, wrong key type...: re-issue
        return False


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _make_server_cert(ca_pem: bytes, ca_key_pem: bytes, names: set[str], ips: set[str]) -> tuple[bytes, bytes]:
    key = _new_key()
    return _sign_server_cert(ca_pem, ca_key_pem, key.public_key(), names, ips), _pem_key(key)


def _sign_server_cert(ca_pem: bytes, ca_key_pem: bytes, public_key, names: set[str], ips: set[str]) -> bytes:
    """A server certificate (1 year, server auth only, not a CA) for `public_key`, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName(n) for n in sorted(names)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tether server")]))
            .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_tls(state_dir: str, listen: list[str], sans: list[str]) -> TlsFiles:
    """The state dir's CA (made once) and a server certificate covering what the server serves
    (re-issued from that CA when it does not, or is within 30 days of its end)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca, ca_key = os.path.join(state_dir, "ca.crt"), os.path.join(state_dir, "ca.key")
    cert, key = os.path.join(state_dir, "server.crt"), os.path.join(state_dir, "server.key")
    names, ips = default_sans(listen, sans)
    have_cert = os.path.exists(cert) and os.path.exists(key)
    if os.path.exists(ca) and not os.path.exists(ca_key):  # the operator took the CA key offline
        if have_cert and _covers(open(cert, "rb").read(), names, ips):
            return TlsFiles(cert, key, ca)
        raise SystemExit(f"{ca_key} is missing, and {cert} must be re-issued (absent, near its end, or not covering "
                         f"{', '.join(sorted(names | ips))}): put the CA key back for this start, or pass "
                         "--tls-cert/--tls-key/--tls-ca")
    if not os.path.exists(ca):
        ca_pem, ca_key_pem = _make_ca(f"tether CA ({socket.gethostname()})")
        _write_private(ca_key, ca_key_pem)
        _write_public(ca, ca_pem)
        log.warning("made a new cluster CA in %s (agents and the CLI trust it with --ca-file; pin: %s)",
                    ca, ca_hash(ca_pem))
    with open(ca, "rb") as f:
        ca_pem = f.read()
    if not have_cert or not _covers(open(cert, "rb").read(), names, ips) or not _issued_by(cert, ca_pem):
        with open(ca_key, "rb") as f:
            cert_pem, key_pem = _make_server_cert(ca_pem, f.read(), names, ips)
        _write_private(key, key_pem)
        _write_public(cert, cert_pem)
        log.info("issued a server certificate for %s", ", ".join(sorted(names) + sorted(ips)))
    return TlsFiles(cert, key, ca)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as e:
        raise SystemExit(f"cannot load the TLS certificate {files.cert} with key {files.key}: {e}; check "
                         "--tls-cert/--tls-key (PEM files, the key matching the certificate)") from None
    return ctx


# --- one CA for every server on a store ---------------------------------------------------------
# The cluster CA's certificate is in the store; its private key stays on the disk of the server that
# made it (and of any server an operator copies it to): those servers sign. A server without the key
# asks for a certificate through the store: it puts a certificate signing request (its own new key
# never leaves it) under CSR_PREFIX, a signer answers under ISSUED_PREFIX. Why not the key itself in
# the store, encrypted: the servers would then need a shared secret to decrypt it, which is a file
# copied by hand again; and a plain key would let anyone who can merely read etcd impersonate a
# server. A signing request needs write access to the store, and whoever can write the store is
# already admin (they can replace the admin token's hash), so signing for them gives nothing away.
CLUSTER_CA = "/tether/auth/ca.crt"  # under auth.AUTH_PREFIX: never listed, watched or served as an object
CSR_PREFIX = "/tether/auth/csr/"
ISSUED_PREFIX = "/tether/auth/issued/"
REQUEST_TTL = 300  # seconds a request and its answer stay in the store (an etcd lease)
SIGN_EVERY = 1.0  # seconds between a signer's looks for requests
CERT_WAIT = 60.0  # seconds a server without the CA key waits for a signer at start


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


async def join_cluster_ca(store, state_dir: str, listen: list[str], sans: list[str], wait: float = CERT_WAIT) -> bool:
    """Make the state dir's CA the one every server on `store` shares, and its server certificate one
    that CA signed; True when this server holds the CA key (it then signs for the others).

    The first server's CA (made now, or already in its state dir) becomes the cluster's; the others
    take its certificate from the store and get their own server certificate signed through it."""
    from tether.store.base import Conflict

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca, ca_key = os.path.join(state_dir, "ca.crt"), os.path.join(state_dir, "ca.key")
    local = _read(ca)
    kv = await store.get(CLUSTER_CA)
    if kv is None:
        made = None if local is not None else _make_ca(f"tether CA ({socket.gethostname()})")
        try:
            await store.create(CLUSTER_CA, local if made is None else made[0])
        except Conflict:  # another server published its CA first: use that one
            kv = await store.get(CLUSTER_CA)
        else:
            if made is not None:
                _write_private(ca_key, made[1])
                _write_public(ca, made[0])
            pem = local if made is None else made[0]
            log.warning("this server's CA %s is the cluster CA now (other servers on this store use it; pin: %s)",
                        ca, ca_hash(pem))
            return os.path.exists(ca_key)
    if kv is None:
        raise SystemExit("the cluster CA disappeared from the store while starting; start again")
    cluster_pem = kv.value
    if local is not None and local != cluster_pem:
        raise SystemExit(f"{ca} (pin {ca_hash(local)}) is not the CA of the servers on this store (pin "
                         f"{ca_hash(cluster_pem)}): this state dir served another cluster. Move ca.crt, ca.key, "
                         f"server.crt and server.key out of {state_dir} to join this cluster's CA, or check --store")
    if local is None:
        _write_public(ca, cluster_pem)
        log.warning("took the cluster CA from the store (pin %s)", ca_hash(cluster_pem))
    if os.path.exists(ca_key):
        return True
    cert, key = os.path.join(state_dir, "server.crt"), os.path.join(state_dir, "server.key")
    names, ips = default_sans(listen, sans)
    have = _read(cert)
    if have is not None and os.path.exists(key) and _covers(have, names, ips) and _issued_by(cert, cluster_pem):
        return False
    cert_pem, key_pem = await _request_certificate(store, cluster_pem, names, ips, wait)
    _write_private(key, key_pem)
    _write_public(cert, cert_pem)
    log.info("a server holding the cluster CA key signed this server's certificate for %s",
             ", ".join(sorted(names) + sorted(ips)))
    return False


async def _request_certificate(store, ca_pem: bytes, names: set[str], ips: set[str],
                               wait: float) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    sans = [x509.DNSName(n) for n in sorted(names)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tether server")]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(key, hashes.SHA256()))
    rid = secrets.token_hex(8)
    lease = await store.grant_lease(REQUEST_TTL)
    await store.create(CSR_PREFIX + rid, csr.public_bytes(serialization.Encoding.PEM), lease)
    start = time.monotonic()
    warned = start
    try:
        while (kv := await store.get(ISSUED_PREFIX + rid)) is None:
            now = time.monotonic()
            if now - start > wait:
                raise SystemExit(f"no server holding the cluster CA key signed this server's certificate in "
                                 f"{wait:g} s: start the server whose state dir has ca.key (the first one), or give "
                                 "this one --tls-cert/--tls-key/--tls-ca")
            if now - warned > 10:
                log.warning("waiting for a server holding the cluster CA key to sign this server's certificate")
                warned = now
            await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(Exception):
            await store.revoke(lease)  # the request and its answer go with it
    cert = x509.load_pem_x509_certificate(kv.value)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    if cert.public_key() != key.public_key():
        raise SystemExit("the certificate signed for this server is not for its key; start again")
    return kv.value, _pem_key(key)


async def sign_requests(store, state_dir: str) -> None:
    """Until cancelled: sign the server certificate requests the other servers put in the store."""
    from tether.store.base import StoreError

    with open(os.path.join(state_dir, "ca.crt"), "rb") as f:
        ca_pem = f.read()
    with open(os.path.join(state_dir, "ca.key"), "rb") as f:
        ca_key_pem = f.read()
    while True:
        try:
            for kv in (await store.list(CSR_PREFIX)).items:
                await _sign_one(store, ca_pem, ca_key_pem, kv)
        except StoreError as e:
            log.warning("cannot look for certificate requests of other servers: %s", e)
        except Exception:  # noqa: BLE001 - a bug in one request must not stop signing for good
            log.exception("signing a certificate request of another server failed")
        await asyncio.sleep(SIGN_EVERY)


async def _sign_one(store, ca_pem: bytes, ca_key_pem: bytes, kv) -> None:
    from cryptography import x509

    from tether.store.base import Compare, Conflict, Delete, Put

    rid = kv.key[len(CSR_PREFIX):]
    try:
        csr = x509.load_pem_x509_csr(kv.value)
        if not csr.is_signature_valid:
            raise ValueError("its signature does not match its key")
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as e:
        log.warning("certificate request %s dropped: %s", rid, e)
        await store.delete(kv.key, kv.mod_revision)
        return
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    cert = _sign_server_cert(ca_pem, ca_key_pem, csr.public_key(), names, ips)
    try:  # once, whichever signer comes first
        await store.txn([Compare(ISSUED_PREFIX + rid, 0), Compare(kv.key, kv.mod_revision)],
                        [Put(ISSUED_PREFIX + rid, cert, kv.lease), Delete(kv.key)])
    except Conflict:
        return
    log.warning("signed a server certificate for another server (%s)", ", ".join(sorted(names) + sorted(ips)))
