"""A long-lived TCP stream for restart tests: `serve PORT` echoes; `send IP PORT SECONDS` writes a
numbered line every 10 ms, checks every echo, and exits 0 only if the one connection never broke.

One-way streams, where the receiving end never sends a byte (only its TCP acknowledgements):
`push-serve PORT SECONDS` accepts one connection and writes a line every 10 ms, `pull IP PORT
SECONDS` connects and only reads (server push, silent client); `push IP PORT SECONDS` connects and
writes, `pull-serve PORT SECONDS` accepts and only reads (the reverse). The reader prints one JSON
line: lines received, the wall-clock time of the last one and every gap over 0.1 s ([end, length])."""

from __future__ import annotations

import json
import socket
import sys
import time

TICK = 0.01


def push(conn: socket.socket, seconds: float) -> None:
    conn.settimeout(0.5)
    end, n = time.time() + seconds, 0
    while time.time() < end:
        try:
            conn.sendall(f"{n}\n".encode())
        except TimeoutError:
            continue
        except OSError:
            return
        n += 1
        time.sleep(TICK)


def pull(conn: socket.socket, seconds: float) -> None:
    conn.settimeout(0.2)
    end = time.time() + seconds
    last, lines, gaps, buf = time.time(), 0, [], b""
    while time.time() < end:
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        now = time.time()
        buf += data
        got = buf.count(b"\n")
        if got:
            buf = buf[buf.rindex(b"\n") + 1:]
            if now - last > 0.1:
                gaps.append([now, now - last])
            last, lines = now, lines + got
    print(json.dumps({"lines": lines, "last": last, "gaps": gaps}), flush=True)


def accepted(port: int) -> socket.socket:
    srv = socket.create_server(("0.0.0.0", port))
    conn, _ = srv.accept()
    srv.close()
    return conn


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
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "send":
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "push-serve":
        push(accepted(int(sys.argv[2])), float(sys.argv[3]))
    elif mode == "pull-serve":
        pull(accepted(int(sys.argv[2])), float(sys.argv[3]))
    elif mode == "push":
        push(socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5), float(sys.argv[4]))
    elif mode == "pull":
        pull(socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5), float(sys.argv[4]))
