"""Run a command with a TCP socket bound inside another network namespace, then exec it.

`python -m tether.lab.netns_listen NETNS IP:PORT -- CMD...` (IPv6: `[IP]:PORT`) enters NETNS, binds and listens on
IP:PORT, returns to its own namespace and execs CMD with `{fd}` in its arguments replaced by the
socket's descriptor. The lab's server runs in the root namespace (the CLI reaches it on loopback, the
agents' state on the same filesystem) yet serves the hosts over the lab's underlay, as a real
server serves its hosts over the network, so their traffic crosses a wire that a test can sniff.
Single-threaded until the exec: switching namespaces is safe here (see STYLE: never in a shared thread).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def bound_in(netns: str, ip: str, port: int) -> socket.socket:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(target)
        try:
            v6 = ":" in ip
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6:  # "::" takes IPv4 too (IPv4-mapped): one listener for a dual-stack underlay
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((ip, port))
            sock.listen(1024)
        finally:
            setns(home)
    finally:
        os.close(home)
        os.close(target)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: python -m tether.lab.netns_listen NETNS IP:PORT -- CMD... ({fd} is replaced)")
    ip, _, port = argv[1].rpartition(":")
    sock = bound_in(argv[0], ip.strip("[]"), int(port))
    cmd = [a.replace("{fd}", str(sock.fileno())) for a in argv[3:]]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
