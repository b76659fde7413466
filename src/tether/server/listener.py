"""uvicorn's h11 protocol with the limits a listener needs before any token is checked.

uvicorn alone holds a connection that never finishes its headers forever (its keep-alive timer
only runs between requests), keeps a response that the client never reads pending forever, and
accepts connections until the process runs out of file descriptors. `guarded_protocol` adds:
- a header deadline: from connect, or from the first byte of a next request, to its last header;
- a write deadline: a client that leaves our answer unread that long is cut off (the transport is
  aborted, its buffer dropped), which also ends a stalled watch stream;
- a connection cap: past it, a new connection displaces the oldest one that has not sent a request
  yet, or is refused;
- a peer key per connection (`scope["state"]["tether_peer"]`) for per-client limits: the IP
  address, or for a unix socket the peer process (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tether.server.limits import Limits

log = logging.getLogger("tether.server")
_last_warning: dict[str, float] = {}


def warn_now_and_then(kind: str, msg: str, *args: Any) -> None:
    """A warning at most every 10 s per kind: a flood of bad clients must not flood the log too."""
    now = time.monotonic()
    if now - _last_warning.get(kind, -1e9) >= 10:
        _last_warning[kind] = now
        log.warning(msg, *args)


def peer_key(transport: asyncio.BaseTransport) -> str:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            return f"unix:pid={pid},uid={uid}"
        except OSError:
            return "unix"
    peer = transport.get_extra_info("peername")
    return f"ip:{peer[0]}" if isinstance(peer, tuple) and peer else "unknown"


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.app_state = dict(app_state)  # per connection: carries the peer key into every scope
            self.opened = time.monotonic()
            self.header_timer: asyncio.TimerHandle | None = None
            self.write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app_state["tether_peer"] = peer_key(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # fixed, not autotuned up to megabytes: a client that stops reading is noticed (the
                # write deadline) after this much, rather than after the kernel has buffered 4 MB
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer)
            if len(self.connections) > limits.max_connections and self._open() > limits.max_connections \
                    and not self._make_room():
                warn_now_and_then("connections", "refusing a connection from %s: %d connections open, the "
                                  "limit (--max-connections)", self.app_state["tether_peer"], len(self.connections) - 1)
                transport.abort()
                return
            self._arm_header_timer()

        def _open(self) -> int:
            return sum(1 for c in self.connections if c.transport is not None and not c.transport.is_closing())

        def _make_room(self) -> bool:
            """Abort the oldest connection that has not sent a request yet: a client that has sent
            nothing is worth less than one that just connected."""
            waiting = [c for c in self.connections if c is not self and getattr(c, "cycle", 1) is None
                       and c.transport is not None and not c.transport.is_closing()]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: getattr(c, "opened", 0.0))
            warn_now_and_then("connections", "connection limit (--max-connections %d) reached: closing the "
                              "oldest connection that sent no request", limits.max_connections)
            oldest.transport.abort()
            return True

        def _arm_header_timer(self) -> None:
            if self.header_timer is None and not self.transport.is_closing():
                # 75-100% of the deadline: connections opened in one burst are not all closed (and
                # re-opened by their client) in one burst, which would stall every request behind it
                delay = limits.header_timeout * (0.75 + 0.25 * random.random())
                self.header_timer = self.loop.call_later(delay, self._headers_late)

        def _cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                warn_now_and_then("headers", "closing a connection from %s: no complete request headers within "
                                  "%g s (--header-timeout)", self.app_state.get("tether_peer"), limits.header_timeout)
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # a request has begun: its headers have until the deadline
            else:
                self._cancel_header_timer()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(limits.write_timeout, self._write_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def _write_stalled(self) -> None:
            self.write_timer = None
            warn_now_and_then("write", "cutting off %s: it left %d bytes of our answer unread for %g s "
                              "(--write-timeout)", self.app_state.get("tether_peer"),
                              self.transport.get_write_buffer_size(), limits.write_timeout)
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None
            super().connection_lost(exc)

        def shutdown(self) -> None:
            """Server stopping: a client that is not reading our answer gets no grace period."""
            if self.flow is not None and self.flow.write_paused:
                self.transport.abort()
                return
            super().shutdown()

    return GuardedH11Protocol
