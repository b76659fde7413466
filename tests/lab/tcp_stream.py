"""A long-lived TCP stream for restart tests: `serve PORT` echoes; `send IP PORT SECONDS` writes a
numbered line every 10 ms, checks every echo, and exits 0 only if the one connection never broke."""

from __future__ import annotations

import socket
import sys
import time


def serve(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port))
    conn, _ = srv.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def send(ip: str, port: int, seconds: float) -> None:
    s = socket.create_connection((ip, port), timeout=5)
    f = s.makefile("rwb")
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        f.write(f"{n}\n".encode())
        f.flush()
        got = f.readline()
        if got != f"{n}\n".encode():
            print(f"broken at message {n}: got {got!r}", flush=True)
            sys.exit(1)
        n += 1
        time.sleep(0.01)
    print(f"ok {n} messages", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
