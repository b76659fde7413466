"""Limits on what one API client can make the server hold: body bytes, watch streams, buffered events.

Everything a client can push is bounded here or in `listener` (connections, header and idle
timeouts): a request body is refused with 413 as soon as it passes `max_body` (counted while it is
read, chunked bodies too), watch streams are capped per client and in all, and each watcher buffers
at most `watch_buffer` bytes of events - one that stops reading is told to resync and cut off.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The server's limits; each is a `tether server` flag of the same name."""

    max_body: int = MiB  # bytes of one request body
    body_timeout: float = 10.0  # seconds to receive a whole body once its headers are in
    header_timeout: float = 5.0  # seconds from connect (or the first byte of a request) to its last header
    idle_timeout: float = 5.0  # seconds a keep-alive connection may wait for its next request
    write_timeout: float = 15.0  # seconds a client may leave our answer unread before it is cut off
    send_buffer: int = 128 << 10  # kernel send buffer of a TCP connection: what a stalled client pins there
    max_connections: int = 1000  # open connections, all listeners together
    max_watches: int = 1000  # watch streams in all
    max_watches_per_client: int = 16  # per peer: an IP address, or a unix-socket peer process
    watch_buffer: int = 128 << 10  # event bytes buffered for one watcher
    watch_stall: float = 10.0  # seconds a full watch buffer may go undrained before the watcher is cut off
    watch_max_replay: int = 10_000  # revisions a watch may start behind the head; further back: resync
    shutdown_deadline: float = 4.5  # seconds from SIGTERM to exit, whatever the clients do


def peer_of(scope: dict[str, Any]) -> str:
    """Who a request comes from, for per-client limits: the listener's peer key (IP address, or the
    unix-socket peer's pid and uid), else the ASGI client address."""
    peer = (scope.get("state") or {}).get("tether_peer")
    if peer:
        return peer
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "local"


def _error_body(path: str, status_text: str, message: str) -> bytes:
    if path.startswith("/v2.0"):
        return json.dumps({"NeutronError": {"type": status_text, "message": message, "detail": ""}}).encode()
    return json.dumps({"detail": message}).encode()


async def refuse(scope: dict[str, Any], send: Any, status: int, status_text: str, message: str) -> None:
    """Answer with an error and close the connection (the rest of the body is never read)."""
    body = _error_body(scope.get("path", ""), status_text, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def too_large(limit: int) -> str:
    return (f"request body larger than {limit} bytes; send smaller objects (the server's limit is its "
            "--max-body flag)")


class BodyLimit:
    """ASGI middleware: reads a request body (up to `max_body` bytes, within `body_timeout` s) before
    the app sees it, so no route ever buffers more; 413 at once when Content-Length says too much,
    or as soon as a chunked body passes the limit; 408 for a body that does not arrive in time."""

    def __init__(self, app: Any, *, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = True
        if not chunked and not length:  # no body (a GET, a DELETE): nothing to read ahead
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body
        if length is not None and length > limit:
            await refuse(scope, send, 413, "HTTPRequestEntityTooLarge", too_large(limit))
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > limit:
                        await refuse(scope, send, 413, "HTTPRequestEntityTooLarge", too_large(limit))
                        return
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await refuse(scope, send, 408, "HTTPRequestTimeout",
                         f"the request body did not arrive within {self.limits.body_timeout:g} s")
            return
        whole = b"".join(chunks)
        given = False

        async def replay() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TooManyWatches(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Watcher:
    """One watch stream's wake-up: set when events arrive, or when the server stops."""

    __slots__ = ("client", "wake", "stopping", "holder")

    def __init__(self, client: str, holder: str = "") -> None:
        self.client = client
        self.holder = holder  # the host whose credential opened it ("" for the admin)
        self.wake = asyncio.Event()
        self.stopping = False


class WatchSlots:
    """Open watch streams, per client and in all; `stop_all` ends them (SIGTERM)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.by_client: Counter[str] = Counter()
        self.open: set[Watcher] = set()
        self.stopping = False

    def acquire(self, client: str, holder: str = "") -> Watcher:
        if self.stopping:
            raise TooManyWatches(503, "the server is shutting down; watch again once it is back")
        if self.by_client[client] >= self.per_client:
            raise TooManyWatches(429, f"this client ({client}) already has {self.by_client[client]} watch streams "
                                      f"open, the limit per client (--max-watches-per-client); close one, or "
                                      "follow all kinds on one stream")
        if len(self.open) >= self.total:
            raise TooManyWatches(503, f"the server has {len(self.open)} watch streams open, its limit "
                                      "(--max-watches); retry later")
        w = Watcher(client, holder)
        self.by_client[client] += 1
        self.open.add(w)
        return w

    def release(self, w: Watcher) -> None:
        if w in self.open:
            self.open.discard(w)
            self.by_client[w.client] -= 1
            if self.by_client[w.client] <= 0:
                del self.by_client[w.client]

    def stop_holder(self, host: str) -> None:
        """A host's credential was revoked: its streams end now (its next call gets 401)."""
        for w in self.open:
            if w.holder == host:
                w.stopping = True
                w.wake.set()

    def stop_all(self) -> None:
        self.stopping = True
        for w in self.open:
            w.stopping = True
            w.wake.set()
