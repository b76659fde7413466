"""The agent's ICMP echo packets (`agent/icmp.py`), built and read without a kernel: sizes as `ping -s`
counted them (the whole IP packet), the checksum, and which replies answer which waiting echo."""

from __future__ import annotations

import socket
import struct

import pytest

from tether.agent.icmp import HEADERS, answered, checksum, echo_reply, echo_request, kernel_time, reply_filter


def ipv4_header(payload_len: int, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + payload_len, 0, 0x4000, 64, 1, 0,
                       socket.inet_aton("192.0.2.2"), socket.inet_aton("192.0.2.1")) + options


def as_reply(request: bytes) -> bytes:
    """What a peer sends back for an ICMPv4 echo request: type 0, the checksum made again."""
    body = b"\0\0\0\0" + request[4:]
    return struct.pack("!BBH", 0, 0, checksum(body)) + request[4:]


def test_the_checksum_is_rfc_1071s() -> None:
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D  # RFC 1071's worked example
    assert checksum(b"\x01") == checksum(b"\x01\x00")  # an odd length is padded with a zero byte


@pytest.mark.parametrize("version", [4, 6])
def test_a_request_is_as_large_as_the_ip_packet_asked_for(version: int) -> None:
    pkt = echo_request(version, 0x1234, 7, 1500)
    assert len(pkt) + HEADERS[version] - 8 == 1500
    kind, code, _sum, ident, seq = struct.unpack_from("!BBHHH", pkt)
    assert (kind, code, ident, seq) == ({4: 8, 6: 128}[version], 0, 0x1234, 7)
    assert len(echo_request(version, 1, 1, 10)) == 8  # never smaller than its header


def test_an_ipv4_request_carries_a_valid_checksum_and_ipv6_leaves_it_to_the_kernel() -> None:
    assert checksum(echo_request(4, 0xBEEF, 513, 777)) == 0
    assert struct.unpack_from("!H", echo_request(6, 0xBEEF, 513, 777), 2) == (0,)


def test_an_ipv4_reply_is_read_past_its_ip_header_whatever_its_options() -> None:
    reply = as_reply(echo_request(4, 0xBEEF, 9, 100))
    assert echo_reply(4, ipv4_header(len(reply)) + reply) == (0xBEEF, 9)
    assert echo_reply(4, ipv4_header(len(reply), options=b"\x01" * 8) + reply) == (0xBEEF, 9)


def test_requests_truncated_packets_and_bad_checksums_are_not_replies() -> None:
    request = echo_request(4, 0xBEEF, 9, 100)
    reply = as_reply(request)
    assert echo_reply(4, ipv4_header(len(request)) + request) is None  # another host's ping of us
    assert echo_reply(4, ipv4_header(len(reply)) + reply[:6]) is None
    corrupt = reply[:20] + bytes([reply[20] ^ 0xFF]) + reply[21:]
    assert echo_reply(4, ipv4_header(len(reply)) + corrupt) is None
    assert echo_reply(4, b"\x60" + bytes(40)) is None  # not IPv4
    v6 = struct.pack("!BBHHH", 129, 0, 0, 0xBEEF, 9)
    assert echo_reply(6, v6) == (0xBEEF, 9)
    assert echo_reply(6, struct.pack("!BBHHH", 128, 0, 0, 0xBEEF, 9)) is None


def test_a_reply_answers_only_the_echo_of_this_socket_with_that_sequence_from_that_address() -> None:
    reply = as_reply(echo_request(4, 0xBEEF, 9, 100))
    data = ipv4_header(len(reply)) + reply
    waiting = {9: "192.0.2.2", 10: "192.0.2.3"}
    assert answered(4, data, "192.0.2.2", 0xBEEF, waiting) == 9
    assert answered(4, data, "192.0.2.2", 0xBEF0, waiting) is None  # another socket's or process's identifier
    assert answered(4, data, "192.0.2.3", 0xBEEF, waiting) is None  # sequence 9 was sent to another address
    assert answered(4, data, "192.0.2.2", 0xBEEF, {10: "192.0.2.2"}) is None  # 9 no longer waits (timed out)


def test_the_kernel_filter_lets_only_echo_replies_through() -> None:
    level, option, value = reply_filter(4)
    (mask,) = struct.unpack("=I", value)
    assert (level, option) == (255, 1) and [t for t in range(32) if not mask >> t & 1] == [0]
    level, option, value = reply_filter(6)
    words = struct.unpack("=8I", value)
    passed = [t for t in range(256) if not words[t >> 5] >> (t & 31) & 1]
    assert (level, option) == (socket.IPPROTO_ICMPV6, 1) and passed == [129]


def test_the_kernel_receive_time_is_read_from_the_timestamp_message() -> None:
    stamp = (socket.SOL_SOCKET, 35, struct.pack("@qq", 1_700_000_000, 250_000_000))
    assert kernel_time([(socket.IPPROTO_IP, 8, b"\0" * 4), stamp]) == pytest.approx(1_700_000_000.25)
    assert kernel_time([]) is None
