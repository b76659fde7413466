"""Unix-socket listeners with the mode set before anyone can connect, never taken from the umask."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def bind_private(path: str, mode: int) -> socket.socket:
    """A listening socket at `path` with `mode`: bound under a temporary name, chmod'ed, then
    renamed into place, so there is no moment when the umask's mode is reachable at `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, path)  # atomically replaces a stale socket of a previous agent
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return sock


async def start_server(serve: Serve, path: str, mode: int, limit: int = 1 << 16) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(serve, sock=bind_private(path, mode), limit=limit)


class ConnectionCap:
    """At most `n` connections served at once; the rest are closed at once (each idle client
    would otherwise hold a task and a descriptor for as long as it likes)."""

    def __init__(self, n: int) -> None:
        self.n, self.open = n, 0

    def wrap(self, serve: Serve) -> Serve:
        async def capped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.open >= self.n:
                writer.transport.abort()
                return
            self.open += 1
            try:
                await serve(reader, writer)
            finally:
                self.open -= 1

        return capped
