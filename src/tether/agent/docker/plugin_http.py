"""A minimal HTTP/1.1 server on a unix socket, enough for Docker's plugin protocol.

Why not uvicorn: dockerd sends only `POST /<Method>` with a small JSON body (or none) and reads a
JSON answer; a few dozen lines on `asyncio.start_unix_server` start in no time, keep connections
alive the way Go's client expects, and add no second web stack to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable

from tether.agent import unix_socket

log = logging.getLogger("tether.docker")
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20  # dockerd's largest call (CreateEndpoint with options) is a few KiB
MAX_HEADERS = 100
IDLE_TIMEOUT = 120.0  # seconds a kept-alive connection may wait for its next request
REQUEST_DEADLINE = 10.0  # seconds from a request's first byte to its last
MAX_CLIENTS = 64


class BadRequest(ValueError):
    def __init__(self, status: int, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.status, self.reason = status, reason

Handler = Callable[[str, dict], Awaitable[dict]]


class PluginHttpServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a dead agent: dockerd would hang on it for ~15 s per call
        # root (and its group): dockerd runs as root; whoever can connect can plug containers
        self.server = await unix_socket.start_server(unix_socket.ConnectionCap(MAX_CLIENTS).wrap(self._serve),
                                                     self.path, 0o660)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await self._read(reader)
                except BadRequest as e:
                    self._answer(writer, e.status, e.reason, {"Err": str(e)}, keep=False)
                    await asyncio.wait_for(writer.drain(), REQUEST_DEADLINE)
                    return
                if request is None:
                    return
                path, body, keep = request
                err = "Error" if path.startswith("/IpamDriver.") else "Err"  # the two APIs name it differently
                status, answer = 200, {}
                try:
                    data = json.loads(body) if body.strip() else {}
                    answer = await self.handler(path, data if isinstance(data, dict) else {})
                except json.JSONDecodeError as e:
                    status, answer = 400, {err: f"bad JSON: {e}"}
                except Exception as e:  # noqa: BLE001 - dockerd must always get an answer
                    log.exception("docker plugin call %s failed", path)
                    answer = {err: f"tether: internal error in {path}: {type(e).__name__}: {e}"}
                self._answer(writer, status, "OK" if status == 200 else "Bad Request", answer, keep)
                await asyncio.wait_for(writer.drain(), REQUEST_DEADLINE)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, TimeoutError) as e:
            log.debug("docker plugin connection ended: %s", e or type(e).__name__)
        finally:
            writer.close()

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: int, reason: str, answer: dict, keep: bool) -> None:
        out = json.dumps(answer).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(out)}\r\n"
                f"{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n")
        writer.write(head.encode() + out)

    @classmethod
    async def _read(cls, reader: asyncio.StreamReader) -> tuple[str, bytes, bool] | None:
        """One request, or None when the client closes or stays idle past IDLE_TIMEOUT; once its
        first byte is in, the whole request must arrive within REQUEST_DEADLINE."""
        try:
            first = await asyncio.wait_for(reader.read(1), IDLE_TIMEOUT)
        except TimeoutError:
            return None
        if not first:
            return None
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):
                return await cls._read_rest(first, reader)
        except TimeoutError:
            raise BadRequest(408, "Request Timeout", f"the request did not arrive within {REQUEST_DEADLINE:g} s") \
                from None

    @staticmethod
    async def _read_rest(first: bytes, reader: asyncio.StreamReader) -> tuple[str, bytes, bool]:
        line = first + await reader.readline()
        parts = line.decode("latin-1").split()
        if len(parts) < 2:
            raise BadRequest(400, "Bad Request", f"bad request line {line[:100]!r}")
        path, version = parts[1], parts[2] if len(parts) > 2 else "HTTP/1.0"
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        else:
            raise BadRequest(431, "Request Header Fields Too Large", f"more than {MAX_HEADERS} header lines")
        too_large = BadRequest(413, "Request Entity Too Large", f"request body larger than {MAX_BODY} bytes")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                if len(body) + size > MAX_BODY:  # before reading it: the declared size may be anything
                    raise too_large
                body += await reader.readexactly(size)
                await reader.readline()
        else:
            n = int(headers.get("content-length", "0"))
            if n > MAX_BODY or n < 0:
                raise too_large
            body = await reader.readexactly(n) if n else b""
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return path, body, keep
