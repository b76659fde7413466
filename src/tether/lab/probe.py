"""Real-packet reachability probes for lab pods (truth tables, `tether trace --probe`).

`serve` runs once per pod, inside its network namespace: it answers TCP and UDP on the given ports
and takes probe requests on a unix socket (unix sockets are reachable from every namespace), so a
whole 9x9x4 matrix needs no process start per probe: each source pod's server tries all its targets
concurrently with a short timeout. `once` probes one target from the current namespace.

Reached means the packet got to the destination: a TCP connect or reset, a UDP echo or an ICMP
port-unreachable. A timeout means it was dropped on the way. Both IPv4 and IPv6 (IPv6-only sockets
on ::, so the two families never share a socket). `once --source` sends from an address that is not
the pod's, and `listen` in the destination records which sources arrived: the anti-spoofing probe
(a reply could not come back to a spoofed address).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys

from tether import jsonline

DEFAULT_PORTS = (80, 81)
ANSWERED, REFUSED, LOST = "answered", "refused", "lost"
IP_TRANSPARENT = 19  # linux/in.h; not in Python's socket module


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class Reply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self.done.done():
            self.done.set_result(ANSWERED)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError) and not self.done.done():
            self.done.set_result(REFUSED)  # ICMP port unreachable: the packet got there


async def probe_tcp(ip: str, port: int, timeout: float) -> str:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except ConnectionRefusedError:
        return REFUSED
    except (TimeoutError, OSError):
        return LOST
    w.close()
    with contextlib.suppress(Exception):
        await w.wait_closed()
    return ANSWERED


# A DNS query (id 0x7470, recursion desired, one question: "." NS IN): port 53 gets one, since a DNS
# server drops a datagram that is not a query and the probe would read that as a drop on the way.
DNS_QUERY = bytes.fromhex("747001000001000000000000") + b"\x00" + bytes.fromhex("00020001")


async def probe_udp(ip: str, port: int, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Reply, remote_addr=(ip, port))
    try:
        for _ in range(3):  # a lost datagram is not a drop: resend within the timeout
            transport.sendto(DNS_QUERY if port == 53 else b"probe")
            try:
                return await asyncio.wait_for(asyncio.shield(proto.done), timeout / 3)
            except TimeoutError:
                continue
        return LOST
    finally:
        transport.close()


async def outcome(ip: str, port: int, proto: str, timeout: float) -> str:
    """ANSWERED (connected, or a datagram back), REFUSED (a TCP reset or ICMP unreachable: something
    on the way or the destination said no at once) or LOST (nothing within the timeout)."""
    if proto.upper() == "UDP":
        return await probe_udp(ip, port, timeout)
    return await probe_tcp(ip, port, timeout)


async def probe(ip: str, port: int, proto: str, timeout: float) -> bool:
    return await outcome(ip, port, proto, timeout) != LOST


async def probe_many(targets: list[list], timeout: float) -> list[bool]:
    return list(await asyncio.gather(*(probe(ip, int(port), proto, timeout) for ip, port, proto in targets)))


async def handle_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        req = json.loads(await reader.readline())
        result = await probe_many(req["targets"], float(req.get("timeout", 0.8)))
        writer.write((json.dumps(result) + "\n").encode())
        await writer.drain()
    finally:
        writer.close()


def udp6(port: int) -> socket.socket:
    """An IPv6-only UDP socket on `port`, beside the IPv4 one (asyncio would not set IPV6_V6ONLY)."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", port))
    return s


async def serve(ports: list[int], control: str) -> None:
    loop = asyncio.get_running_loop()

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    servers = []
    for port in ports:
        servers.append(await asyncio.start_server(answer, "0.0.0.0", port, reuse_address=True, backlog=256))
        await loop.create_datagram_endpoint(Echo, local_addr=("0.0.0.0", port), family=socket.AF_INET)
        if socket.has_ipv6:  # and on IPv6 (the IPv6 truth tables); a namespace without IPv6 just skips it
            with contextlib.suppress(OSError):
                servers.append(await asyncio.start_server(answer, "::", port, reuse_address=True, backlog=256))
                await loop.create_datagram_endpoint(Echo, sock=udp6(port))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control)
    servers.append(await asyncio.start_unix_server(handle_control, control))
    print("ready", flush=True)
    await asyncio.Event().wait()


def send_from(source: str, ip: str, port: int) -> None:
    """Three UDP datagrams from `source`, an address this namespace need not have (IP_TRANSPARENT):
    what a pod that spoofs its source sends."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((source, 0))
        for _ in range(3):
            s.sendto(b"probe", (ip, port))


def listen(port: int, seconds: float) -> list[str]:
    """The source addresses of the UDP datagrams that arrive on `port` within `seconds`."""
    import time

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seen: list[str] = []
    with s:
        s.bind(("0.0.0.0", port))
        s.settimeout(0.05)
        print("ready", flush=True)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                seen.append(s.recvfrom(100)[1][0])
    return seen


def ask(control: str, targets: list[tuple[str, int, str]], timeout: float = 0.8) -> list[bool]:
    """Run probes from the pod whose `serve` listens on `control` (blocking)."""
    return jsonline.request(control, {"targets": [list(t) for t in targets], "timeout": timeout}, timeout * 4 + 10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tether.lab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)))
    s.add_argument("--control", required=True)
    o = sub.add_parser("once")
    o.add_argument("ip")
    o.add_argument("port", type=int)
    o.add_argument("proto", default="TCP", nargs="?")
    o.add_argument("--timeout", type=float, default=1.0)
    o.add_argument("--source", help="send three UDP datagrams from this address (spoofing) and exit")
    lp = sub.add_parser("listen")
    lp.add_argument("port", type=int)
    lp.add_argument("--seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        asyncio.run(serve([int(x) for x in a.ports.split(",") if x], a.control))
    elif a.cmd == "listen":
        print(json.dumps(listen(a.port, a.seconds)))
    elif a.source:
        send_from(a.source, a.ip, a.port)
        print(json.dumps({"sent": True}))
    else:
        got = asyncio.run(outcome(a.ip, a.port, a.proto, a.timeout))
        ok = got != LOST
        print(json.dumps({"reached": ok, "outcome": got}))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
