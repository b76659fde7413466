"""Real-packet reachability probes for lab pods (truth tables, `tether trace --probe`).

`serve` runs once per pod, inside its network namespace: it answers TCP and UDP on the given ports
and takes probe requests on a unix socket (unix sockets are reachable from every namespace), so a
whole 9x9x4 matrix needs no process start per probe: each source pod's server tries all its targets
concurrently with a short timeout. `once` probes one target from the current namespace.

Reached means the packet got to the destination: a TCP connect or reset, a UDP echo or an ICMP
port-unreachable. A timeout means it was dropped on the way. Both IPv4 and IPv6 (IPv6-only sockets
on ::, so the two families never share a socket).
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


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class Reply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self.done.done():
            self.done.set_result(True)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError) and not self.done.done():
            self.done.set_result(True)  # ICMP port unreachable: the packet got there


async def probe_tcp(ip: str, port: int, timeout: float) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except ConnectionRefusedError:
        return True
    except (TimeoutError, OSError):
        return False
    w.close()
    with contextlib.suppress(Exception):
        await w.wait_closed()
    return True


async def probe_udp(ip: str, port: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Reply, remote_addr=(ip, port))
    try:
        for _ in range(3):  # a lost datagram is not a drop: resend within the timeout
            transport.sendto(b"probe")
            try:
                return await asyncio.wait_for(asyncio.shield(proto.done), timeout / 3)
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()


async def probe(ip: str, port: int, proto: str, timeout: float) -> bool:
    if proto.upper() == "UDP":
        return await probe_udp(ip, port, timeout)
    return await probe_tcp(ip, port, timeout)


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
    a = p.parse_args(argv)
    if a.cmd == "serve":
        asyncio.run(serve([int(x) for x in a.ports.split(",") if x], a.control))
    else:
        ok = asyncio.run(probe(a.ip, a.port, a.proto, a.timeout))
        print(json.dumps({"reached": ok}))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
