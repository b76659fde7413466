"""Raw ICMP watcher for timing benches: when do echo replies from a set of addresses start or stop.

Run inside a pod's namespace (`ip netns exec NS python -I -S icmp_watch.py`; no imports beyond the
standard library, so it starts in ~20 ms); it prints `ready`, then answers one line per command:

- `up IP[,IP...] SECONDS`: ping every address (one echo per address every `INTERVAL`) until each has
  answered once; prints `IP=<CLOCK_MONOTONIC of the first reply or None> ...`;
- `down IP[,IP...] SECONDS QUIET`: ping until each address has been silent for QUIET seconds; prints
  `IP=<time of the last reply before that silence, or None if it never answered> ...`.

Every echo carries a new ICMP identifier, so conntrack sees each as a new flow: an established
echo flow can never carry replies past a policy that now denies it. CLOCK_MONOTONIC is shared by
every process on the machine, so the bench compares these instants with its own directly.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time

INTERVAL = 0.002


def csum(b: bytes) -> int:
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF


class Pinger:
    def __init__(self) -> None:
        self.s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.s.setblocking(False)
        self.ident = (os.getpid() * 7919) & 0xFFFF

    def send(self, ip: str) -> None:
        self.ident = (self.ident + 1) & 0xFFFF
        hdr = struct.pack("!BBHHH", 8, 0, 0, self.ident, 1)
        try:
            self.s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr), self.ident, 1), (ip, 0))
        except OSError:  # no route yet (the pod's own network can be unreachable for a moment)
            pass

    def replies(self, until: float) -> list[tuple[str, float]]:
        """Echo replies (source, arrival) read until `until`."""
        out = []
        while True:
            left = until - time.monotonic()
            if left <= 0 or not select.select([self.s], [], [], left)[0]:
                return out
            while True:
                try:
                    data, addr = self.s.recvfrom(2048)
                except BlockingIOError:
                    break
                if len(data) >= 21 and data[20] == 0:  # echo reply
                    out.append((addr[0], time.monotonic()))


def up(p: Pinger, ips: list[str], seconds: float) -> dict[str, float | None]:
    first: dict[str, float | None] = dict.fromkeys(ips)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(v is None for v in first.values()):
        for ip in ips:
            if first[ip] is None:
                p.send(ip)
        for ip, t in p.replies(time.monotonic() + INTERVAL):
            if ip in first and first[ip] is None:
                first[ip] = t
    return first


def down(p: Pinger, ips: list[str], seconds: float, quiet: float) -> dict[str, float | None]:
    last: dict[str, float | None] = dict.fromkeys(ips)
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        now = time.monotonic()
        if all(now - (last[ip] or start) >= quiet for ip in ips):
            break
        for ip in ips:
            p.send(ip)
        for ip, t in p.replies(time.monotonic() + INTERVAL):
            if ip in last:
                last[ip] = t
    return last


def main() -> None:
    p = Pinger()
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        ips = parts[1].split(",")
        got = up(p, ips, float(parts[2])) if parts[0] == "up" else down(p, ips, float(parts[2]), float(parts[3]))
        print(" ".join(f"{ip}={t}" for ip, t in got.items()), flush=True)


if __name__ == "__main__":
    main()
