"""Forged TCP segments for lab tests: `send SRC SPORT DST DPORT FLAGS TEXT` sends one segment with
those flags (e.g. "A" for a bare ACK, no SYN) and TEXT as payload, from a raw socket, belonging to
no connection; `expect DPORT TEXT SECONDS` prints "got" if a TCP segment to DPORT carrying TEXT
arrives within SECONDS, else "nothing"."""

from __future__ import annotations

import socket
import struct
import sys
import time

from tether.agent.icmp import checksum  # the Internet checksum (RFC 1071), one home

FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}


def send(src: str, sport: int, dst: str, dport: int, flags: str, text: str) -> None:
    payload = text.encode()
    bits = sum(FLAGS[f] for f in flags)
    header = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, bits, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header) + len(payload))
    header = header[:16] + struct.pack("!H", checksum(pseudo + header + payload)) + header[18:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.bind((src, 0))
        s.sendto(header + payload, (dst, 0))


def expect(dport: int, text: str, seconds: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.settimeout(0.2)
        end = time.time() + seconds
        while time.time() < end:
            try:
                packet = s.recv(65535)
            except TimeoutError:
                continue
            ihl = (packet[0] & 0x0F) * 4
            if struct.unpack("!H", packet[ihl + 2:ihl + 4])[0] == dport and text.encode() in packet:
                print("got", flush=True)
                return
    print("nothing", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7])
    else:
        expect(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
