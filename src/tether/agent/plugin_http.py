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

log = logging.getLogger("tether.docker")
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 4 << 20

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
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o660)

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
                request = await self._read(reader)
                if request is None:
                    return
                path, body, keep = request
                status, answer = 200, {}
                try:
                    data = json.loads(body) if body.strip() else {}
                    answer = await self.handler(path, data if isinstance(data, dict) else {})
                except json.JSONDecodeError as e:
                    status, answer = 400, {"Err": f"bad JSON: {e}"}
                except Exception as e:  # noqa: BLE001 - dockerd must always get an answer
                    log.exception("docker plugin call %s failed", path)
                    answer = {"Err": f"tether: internal error in {path}: {type(e).__name__}: {e}"}
                out = json.dumps(answer).encode()
                head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Bad Request'}\r\n"
                        f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(out)}\r\n"
                        f"{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n")
                writer.write(head.encode() + out)
                await writer.drain()
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            log.debug("docker plugin connection ended: %s", e)
        finally:
            writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[str, bytes, bool] | None:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) < 2:
            raise ValueError(f"bad request line {line!r}")
        path, version = parts[1], parts[2] if len(parts) > 2 else "HTTP/1.0"
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                body += await reader.readexactly(size)
                await reader.readline()
                if len(body) > MAX_BODY:
                    raise ValueError("body too large")
        else:
            n = int(headers.get("content-length", "0"))
            if n > MAX_BODY:
                raise ValueError("body too large")
            body = await reader.readexactly(n) if n else b""
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return path, body, keep
