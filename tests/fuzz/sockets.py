"""Talking to the agent's unix sockets the way a malformed client would."""

from __future__ import annotations

import socket


def exchange(path: str, data: bytes, timeout: float = 10) -> bytes:
    """Send `data`, end our side, read the whole answer (b"" when the agent just closes)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent refused the frame before reading all of it: as good as an answer
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        s.close()
