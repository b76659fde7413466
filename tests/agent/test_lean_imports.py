"""The agent imports only the parts of pyroute2 and httpx it uses (issue 29: an agent's memory is
mostly its imports), and both libraries still work in full for code that asks for more."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

PROBE = """
import sys
import tether.agent.main, tether.dataplane.links, tether.dataplane.pods
heavy = sorted(m for m in ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ethtool", "pyroute2.nslink", "rich",
                           "click", "pygments") if m in sys.modules)
print("heavy", heavy)
import pyroute2
from pyroute2.iproute import IPRoute
from pyroute2 import NDB, IPRoute as Top
assert Top is IPRoute and pyroute2.IPRoute is IPRoute and NDB.__name__ == "NDB"
print("whole", "pyroute2.ndb" in sys.modules)
"""


def test_the_agent_leaves_unused_parts_of_pyroute2_and_httpx_unimported_yet_available() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "heavy []" in out.stdout, out.stdout
    assert "whole True" in out.stdout, out.stdout


def test_a_joining_host_checks_the_ca_pin_without_loading_cryptography(tmp_path) -> None:
    """`cryptography` is ~10 MB an agent would keep for its life after its first start (the join);
    the pin it computes by hand is the one `cryptography` gives for the CA's public key."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tether.server.tls import _make_ca

    pem, _key = _make_ca("probe-ca")
    (tmp_path / "ca.crt").write_bytes(pem)
    spki = x509.load_pem_x509_certificate(pem).public_key().public_bytes(Encoding.DER,
                                                                        PublicFormat.SubjectPublicKeyInfo)
    probe = ("import sys\nfrom tether.join import join\nfrom tether.trust import ca_hash\n"
             f"print(ca_hash(open({str(tmp_path / 'ca.crt')!r}, 'rb').read()))\n"
             "print('loaded' if any(m.startswith('cryptography') for m in sys.modules) else 'not loaded')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sha256:" + hashlib.sha256(spki).hexdigest(), "not", "loaded"], out.stdout


def test_a_ca_pin_of_something_that_is_not_a_certificate_is_refused_with_why() -> None:
    from tether.trust import ca_hash

    for junk in (b"not a certificate", b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError, match="not a PEM X.509 certificate"):
            ca_hash(junk)


def test_a_ca_pin_refuses_ber_forms_another_parser_could_read_differently() -> None:
    """The pin is read by `trust._der`, TLS trusts what OpenSSL reads: an indefinite length (BER),
    a long length form where the short one fits, or a multi-byte tag could make the two disagree
    on where the public key is, so they are refused."""
    import base64

    from tether.trust import ca_hash

    def pem(der: bytes) -> bytes:
        return b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der) + b"\n-----END CERTIFICATE-----\n"

    from tether.server.tls import _make_ca

    real = ssl.PEM_cert_to_DER_cert(_make_ca("ber-ca")[0].decode())
    assert real[:2] == b"\x30\x82"  # a SEQUENCE with a two-byte length
    body = real[4:]
    assert ca_hash(pem(real)).startswith("sha256:")
    for der in (b"\x30\x80" + body + b"\x00\x00",  # the same certificate, indefinite length
                b"\x30\x83\x00" + real[2:4] + body,  # a length with a leading zero byte
                b"\x3f\x01\x00\x00"):  # a multi-byte tag
        with pytest.raises(ValueError, match="not a PEM X.509 certificate"):
            ca_hash(pem(der))
