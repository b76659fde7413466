"""Element batches over netlink without a kernel: keys and values encoded as nft encodes them, one
message per set and change, large changes split, and what only nft can do refused (the namespace
test compares with nft's own listing: test_nft_netlink_netns.py)."""

from __future__ import annotations

import struct
import sys

import pytest

from tether.dataplane import nft_netlink as nl


def test_fields_are_encoded_as_nft_encodes_them() -> None:
    assert nl.key_bytes("ipv4_addr", "10.0.0.5") == bytes([10, 0, 0, 5])
    assert nl.key_bytes("ipv4_addr", "10.0.0.5/32") == bytes([10, 0, 0, 5])  # an address written as a /32
    assert nl.key_bytes("ipv6_addr", "fd00::1") == bytes.fromhex("fd000000000000000000000000000001")
    assert nl.key_bytes("ifname", "tth1") == b"tth1" + b"\0" * 12
    assert nl.key_bytes("inet_service", 80) == b"\x00\x50"  # alone: 16 bits, network order
    # in a concatenation every field takes 4 bytes; the mark is in host order
    assert nl.key_bytes(("ipv4_addr", "inet_proto", "inet_service", "mark"), ("10.250.0.1", "tcp", 80, 1)) == (
        bytes([10, 250, 0, 1]) + b"\x06\0\0\0" + b"\x00\x50\0\0" + (1).to_bytes(4, sys.byteorder))
    assert nl.key_bytes(("ifname", "ipv4_addr"), ("tth1", "10.0.0.1")) == b"tth1" + b"\0" * 12 + bytes([10, 0, 0, 1])


@pytest.mark.parametrize("typ, value", [
    ("ipv4_addr", "10.0.0.0/24"),  # a prefix: only interval sets hold those
    ("ipv4_addr", "fd00::1"),
    ("ipv4_addr", "10.0.0.1-10.0.0.9"),
    ("ifname", "tth*"),
    ("ifname", "a-name-longer-than-15"),
    ("ether_addr", "02:00:00:00:00:01"),  # a type not encoded here
    (("ipv4_addr", "inet_service"), ("10.0.0.1",)),
])
def test_what_only_nft_encodes_is_refused(typ: str | tuple[str, ...], value: object) -> None:
    with pytest.raises((nl.Unencodable, ValueError)):
        nl.key_bytes(typ, value)


def messages(batch: nl.Batch) -> list[tuple[int, int, bytes]]:
    out, off = [], 0
    while off < len(batch.data):
        length, kind, flags, _, _ = nl.HEADER.unpack_from(batch.data, off)
        out.append((kind, flags, batch.data[off + nl.HEADER.size:off + length]))
        off += length
    return out


def test_a_batch_is_begin_one_message_per_change_end() -> None:
    batch = nl.encode("tether", [
        nl.Change(False, "ep_in", "ifname", "verdict", (), ("tth1",)),
        nl.Change(True, "ep_in", "ifname", "verdict", (), (("tth1", "goto in-b"),)),
        nl.Change(True, "svc_backend_port", ("ipv4_addr", "inet_proto", "inet_service", "mark"), "inet_service", (),
                  ((("10.250.0.1", "tcp", 80, 1), 8080),))])
    kinds = [(k, f) for k, f, _ in messages(batch)]
    assert kinds == [(nl.NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST),
                     (10 << 8 | nl.NFT_MSG_DELSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_ACK),
                     (10 << 8 | nl.NFT_MSG_NEWSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE),
                     (10 << 8 | nl.NFT_MSG_NEWSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE),
                     (nl.NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST)]
    assert sorted(batch.names.values()) == ["ep_in", "ep_in", "svc_backend_port"]
    _, _, add = messages(batch)[2]
    assert b"tether\0" in add and b"ep_in\0" in add and b"in-b\0" in add
    assert struct.pack(">i", -4) in add  # NFT_GOTO
    _, _, port = messages(batch)[3]
    assert b"\x1f\x90" in port  # the value 8080, 16 bits network order


def test_a_large_change_is_split_into_messages_and_a_huge_one_is_left_to_nft() -> None:
    elems = tuple(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(5000))
    batch = nl.encode("tether", [nl.Change(True, "sel-1", "ipv4_addr", None, (), elems)])
    body = messages(batch)[1:-1]
    assert len(body) > 1 and all(len(p) < 65536 for _, _, p in body)
    with pytest.raises(nl.Unencodable):
        nl.encode("tether", [nl.Change(True, "sel-1", "ipv4_addr", None, (), elems * 3)])


def test_interval_sets_are_left_to_nft() -> None:
    with pytest.raises(nl.Unencodable):
        nl.encode("tether", [nl.Change(True, "nets", "ipv4_addr", None, ("interval",), ("10.0.0.1",))])


# --- the ruleset generation (NFT_MSG_GETGEN) --------------------------------------------------------

def newgen(seq: int, gen: int, kind: int = 10 << 8 | nl.NFT_MSG_NEWGEN) -> bytes:
    """The kernel's answer to GETGEN (nf_tables_fill_gen_info): nfgenmsg, then the generation (32
    bits, network order), the asking process's pid and name."""
    body = (struct.pack("=BBH", 0, 0, 0) + nl._attr(nl.NFTA_GEN_ID, gen.to_bytes(4, "big"))
            + nl._attr(2, (4242).to_bytes(4, "big")) + nl._attr(3, b"python3\0"))
    return nl.HEADER.pack(nl.HEADER.size + len(body), kind, 0, seq, 0) + body


def test_the_generation_request_is_a_getgen_of_any_family() -> None:
    data = nl.generation_request(7)
    assert data == nl.HEADER.pack(20, 10 << 8 | 16, nl.NLM_F_REQUEST, 7, 0) + b"\0\0\0\0"


def test_the_generation_is_read_from_the_answer_to_that_request() -> None:
    other = newgen(6, 1)  # an answer to an earlier request
    assert nl.parse_generation(other + newgen(7, 0x01020304), 7) == 0x01020304
    assert nl.parse_generation(other, 7) is None
    assert nl.parse_generation(newgen(7, 5, kind=10 << 8 | nl.NFT_MSG_NEWSETELEM), 7) is None
    # the kernel may mark the attribute as in network order (NLA_F_NET_BYTEORDER): same value
    flagged = newgen(7, 9).replace(struct.pack("=HH", 8, nl.NFTA_GEN_ID), struct.pack("=HH", 8, 0x4000 | 1), 1)
    assert nl.parse_generation(flagged, 7) == 9


def test_a_refused_generation_request_raises_with_the_kernels_error() -> None:
    err = nl.HEADER.pack(nl.HEADER.size + 4 + 20, nl.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -1) + b"\0" * 20
    with pytest.raises(OSError) as e:
        nl.parse_generation(err, 7)
    assert e.value.errno == 1  # EPERM: not CAP_NET_ADMIN in that namespace


def test_the_generation_after_the_last_skips_zero() -> None:
    assert nl.next_generation(41) == 42
    assert nl.next_generation(0xFFFFFFFF) == 1
