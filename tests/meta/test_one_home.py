"""One home per concept (issue 24): nft expressions are built in calc/nft.py and names derived from
ids or digests are made in calc/names.py. Outside calc/, no module spells an nft expression and
only the credential code hashes (a token's or a certificate's digest is not a kernel name)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tether"
NFT_EXPRESSION = re.compile(r'["\'](payload|mangle|match|meta|ct|vmap|dnat|snat|masquerade)["\']\s*:')
CREDENTIAL_HASHING = {"server/auth.py", "trust.py"}
CONTENT_DIGESTS = {"lab/containerd.py"}  # an OCI image's blobs are addressed by their sha256: not a name


def _outside_calc() -> list[tuple[str, str]]:
    return [(str(p.relative_to(SRC)), p.read_text()) for p in sorted(SRC.rglob("*.py"))
            if p.relative_to(SRC).parts[0] != "calc"]


def test_no_module_outside_calc_spells_an_nft_expression() -> None:
    found = [f"{name}:{text[:m.start()].count(chr(10)) + 1}" for name, text in _outside_calc()
             for m in NFT_EXPRESSION.finditer(text)]
    assert not found, f"build these with tether.calc.nft: {found}"


def test_no_module_outside_calc_derives_a_name_by_hashing() -> None:
    found = [name for name, text in _outside_calc()
             if re.search(r"^\s*(import hashlib|from hashlib)", text, re.M)
             and name not in CREDENTIAL_HASHING | CONTENT_DIGESTS]
    assert not found, f"derive names with tether.calc.names (digest, sha1_hex, ...): {found}"
