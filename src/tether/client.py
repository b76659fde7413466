"""Clients of the Tether REST API (sync for the CLI, async for the agent), over TCP or a unix socket.

`unix:///run/tether/server.sock` reaches a server from any network namespace, which is how agents
inside lab host namespaces talk to it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx

from tether.model import KINDS, PLURALS, Endpoint, Host, Obj

T = TypeVar("T", bound=Obj)


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ServerUnreachable(Exception):
    pass


NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]  # headers and body go out in separate writes


def _transport(server: str, async_: bool) -> tuple[str, Any]:
    if server.startswith("unix://"):
        path = server[len("unix://"):]
        t = httpx.AsyncHTTPTransport(uds=path) if async_ else httpx.HTTPTransport(uds=path)
        return "http://tether", t
    if not server.startswith(("http://", "https://")):
        server = "http://" + server
    t = httpx.AsyncHTTPTransport(socket_options=NODELAY) if async_ else httpx.HTTPTransport(socket_options=NODELAY)
    return server.rstrip("/"), t


def path_of(kind: str, store_name: str | None = None, namespace: str | None = None) -> str:
    plural = PLURALS[kind]
    if KINDS[kind].namespaced and store_name is not None:
        ns, _, name = store_name.rpartition("/")
        return f"/api/v1/namespaces/{ns or namespace or 'default'}/{plural}/{name}"
    return f"/api/v1/{plural}" + (f"/{store_name}" if store_name is not None else "")


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        d = body.get("detail", body) if isinstance(body, dict) else body
        return d if isinstance(d, str) else json.dumps(d)
    except ValueError:
        return r.text or r.reason_phrase


def _unreachable(server: str, e: Exception) -> ServerUnreachable:
    return ServerUnreachable(f"cannot reach the Tether server at {server} ({e.__class__.__name__}: {e}); "
                             "start it with `tether server`, or point --server / TETHER_SERVER at it")


class _Common:
    server: str

    @staticmethod
    def _check(r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    @staticmethod
    def _obj(kind: str, data: dict) -> Obj:
        data = {k: v for k, v in data.items() if k != "alive"}
        return KINDS[kind].model_validate(data)

    @staticmethod
    def _write_path(obj: Obj) -> tuple[str, str]:
        if obj.kind in ("Endpoint", "SecurityGroup"):
            return "POST", path_of(obj.kind)
        if obj.kind == "Network":
            return "PUT", path_of("Network", obj.name)
        return "PUT", path_of(obj.kind, obj.store_name())


class TetherClient(_Common):
    def __init__(self, server: str, token: str | None = None, timeout: float = 30) -> None:
        self.server = server
        base, transport = _transport(server, False)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=base, transport=transport, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e
        return self._check(r)

    def list(self, kind: str, **filters: Any) -> list[Obj]:
        params = {k: v for k, v in filters.items() if v is not None}
        return [self._obj(kind, d) for d in self.request("GET", path_of(kind), params=params)]

    def list_raw(self, kind: str, **filters: Any) -> list[dict]:
        return self.request("GET", path_of(kind), params={k: v for k, v in filters.items() if v is not None})

    def get(self, kind: str, store_name: str) -> Obj:
        return self._obj(kind, self.request("GET", path_of(kind, store_name)))

    def apply(self, obj: Obj) -> Obj:
        method, path = self._write_path(obj)
        return self._obj(obj.kind, self.request(method, path, content=obj.model_dump_json(exclude={"revision"})))

    def create_network(self, obj: Obj) -> Obj:
        return self._obj("Network", self.request("POST", "/api/v1/networks",
                                                 content=obj.model_dump_json(exclude={"revision"})))

    def delete(self, kind: str, store_name: str) -> None:
        self.request("DELETE", path_of(kind, store_name))

    def create_endpoint(self, ep: Endpoint) -> Endpoint:
        return Endpoint.model_validate(self.request("POST", "/api/v1/endpoints",
                                                    content=ep.model_dump_json(exclude={"revision"})))

    def snapshot(self) -> dict:
        return self.request("GET", "/api/v1/snapshot")

    def close(self) -> None:
        self.http.close()


class AsyncTetherClient(_Common):
    def __init__(self, server: str, token: str | None = None, timeout: float = 10) -> None:
        self.server = server
        base, transport = _transport(server, True)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.AsyncClient(base_url=base, transport=transport, headers=headers, timeout=timeout)

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e
        return self._check(r)

    async def register_host(self, host: Host) -> Host:
        data = await self.request("PUT", path_of("Host", host.name), content=host.model_dump_json(exclude={"revision"}))
        return Host.model_validate(data)

    async def heartbeat(self, name: str, ttl: float) -> None:
        await self.request("POST", f"/api/v1/hosts/{name}/heartbeat", json={"ttl": ttl})

    async def create_endpoint(self, ep: Endpoint) -> Endpoint:
        data = await self.request("POST", "/api/v1/endpoints", content=ep.model_dump_json(exclude={"revision"}))
        return Endpoint.model_validate(data)

    async def patch_endpoint(self, ep_id: str, changes: dict) -> Endpoint:
        return Endpoint.model_validate(await self.request("PATCH", f"/api/v1/endpoints/{ep_id}", json=changes))

    async def release_by_handle(self, handle: str) -> dict:
        return await self.request("DELETE", f"/api/v1/endpoints/by-handle/{handle}")

    async def get(self, kind: str, store_name: str) -> Obj:
        return self._obj(kind, await self.request("GET", path_of(kind, store_name)))

    async def list(self, kind: str, **filters: Any) -> list[Obj]:
        params = {k: v for k, v in filters.items() if v is not None}
        return [self._obj(kind, d) for d in await self.request("GET", path_of(kind), params=params)]

    async def apply(self, obj: Obj) -> Obj:
        method, path = self._write_path(obj)
        return self._obj(obj.kind, await self.request(method, path, content=obj.model_dump_json(exclude={"revision"})))

    async def delete(self, kind: str, store_name: str) -> None:
        await self.request("DELETE", path_of(kind, store_name))

    async def snapshot(self) -> dict:
        return await self.request("GET", "/api/v1/snapshot")

    async def watch(self, after_revision: int) -> AsyncIterator[dict]:
        """Events after a revision, one dict per line; ends after a `resync` line or on disconnect."""
        try:
            async with self.http.stream("GET", "/api/v1/watch", params={"after_revision": after_revision},
                                        timeout=httpx.Timeout(10, read=30)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise ApiError(r.status_code, _detail(r))
                async for line in r.aiter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e

    async def close(self) -> None:
        await self.http.aclose()
