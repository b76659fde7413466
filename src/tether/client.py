"""Clients of the Tether REST API (sync for the CLI, async for the agent), over HTTPS, loopback
HTTP or a unix socket, to one server or several (`a,b,c`): a request that cannot reach one server,
or gets 503 from it, goes to the next, and a watch stream that breaks resumes on the next server
from the last revision it delivered.

HTTPS servers are verified against the cluster CA (`ca_file`, the server's `ca.crt`).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
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


def server_list(server: str | list[str] | tuple[str, ...]) -> list[str]:
    """`a,b,c`, or a list of such, as a list of addresses (the order is the order of preference)."""
    items = [server] if isinstance(server, str) else list(server)
    out = [s.strip() for item in items for s in item.split(",") if s.strip()]
    if not out:
        raise ValueError("no server address given: pass --server URL (several: a,b,c or --server repeated)")
    return out


def _verify(server: str, ca_file: str | None) -> ssl.SSLContext | bool:
    if not server.startswith("https://"):
        return False
    from tether.trust import client_context

    return client_context(ca_file)


def _transport(server: str, async_: bool, ca_file: str | None = None) -> tuple[str, Any]:
    if server.startswith("unix://"):
        path = server[len("unix://"):]
        t = httpx.AsyncHTTPTransport(uds=path) if async_ else httpx.HTTPTransport(uds=path)
        return "http://tether", t
    if not server.startswith(("http://", "https://")):
        server = "http://" + server
    kw: dict[str, Any] = {"socket_options": NODELAY}
    if server.startswith("https://"):
        kw["verify"] = _verify(server, ca_file)
    t = httpx.AsyncHTTPTransport(**kw) if async_ else httpx.HTTPTransport(**kw)
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


def parse_snapshot(body: bytes) -> Any:
    """A snapshot's body (every object of the cluster: ~15 MB at 10,000 endpoints) parsed by
    pydantic's parser, which keeps one copy of each distinct short string (names, label keys and
    values, addresses' prefixes) where `json` makes one per occurrence, and reads the bytes without
    first decoding them to a str of the same size: a lower peak while the agent decodes the
    replica from it, and so less heap left fragmented for the agent's life (bench/NOTES.md,
    agent_scale). The same parser reads the agent's copy on disk (`replica_file`)."""
    import pydantic_core

    return pydantic_core.from_json(body)


def _unreachable(server: str, e: Exception) -> ServerUnreachable:
    if "CERTIFICATE_VERIFY_FAILED" in str(e) or isinstance(e, ssl.SSLCertVerificationError):
        return ServerUnreachable(f"the Tether server at {server} is not the one you trust: its TLS certificate does "
                                 f"not verify against the CA given ({e}); pass the cluster's CA with --ca-file (the "
                                 "server's state dir, file ca.crt), or join with `tether host join --ca-hash ...`")
    return ServerUnreachable(f"cannot reach the Tether server at {server} ({e.__class__.__name__}: {e}); "
                             "start it with `tether server`, or point --server / TETHER_SERVER at it")


IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


def may_retry_elsewhere(method: str, e: httpx.TransportError) -> bool:
    """A request that never reached a server can go to the next one; one that may have been done
    only when doing it twice is harmless (an idempotent method)."""
    return isinstance(e, httpx.ConnectError | httpx.ConnectTimeout) or method.upper() in IDEMPOTENT


class _Common:
    server: str
    servers: list[str]
    current: int = 0  # the server that answered last: the next request starts there
    https: list  # one httpx client per server, in `servers` order

    def _unreachable_or_raise(self, i: int, method: str, e: httpx.TransportError) -> Exception:
        """Server i could not be reached: the failure to remember while the next one is tried, or
        raised now when the request may have reached it and must not be sent twice."""
        failure = _unreachable(self.servers[i], e)
        if not may_retry_elsewhere(method, e):
            raise failure from e
        return failure

    def _unavailable(self, i: int, r: httpx.Response, order: list[int]) -> Exception | None:
        """Server i answered: None to take its answer (it becomes the current one), or its 503 to
        remember while the next server is tried (the last server's 503 is the answer)."""
        if r.status_code == 503 and i != order[-1]:
            return ApiError(503, _detail(r))
        self.current = i
        return None

    @property
    def http(self) -> Any:
        """The httpx client (sync or async) of the server that answered last."""
        return self.https[self.current]

    def _connect(self, server: str | list[str], token: str | None, timeout: float, ca_file: str | None,
                 client_class: type) -> None:
        """One httpx client (`client_class`, sync or async) per server of the comma list or list."""
        self.servers = server_list(server)
        self.server = ",".join(self.servers)
        headers = self._headers(token)
        self.https = []
        for s in self.servers:
            base, transport = _transport(s, client_class is httpx.AsyncClient, ca_file)
            self.https.append(client_class(base_url=base, transport=transport, headers=headers, timeout=timeout))

    def _order(self) -> list[int]:
        n = len(self.servers)
        return [(self.current + i) % n for i in range(n)]

    @staticmethod
    def _headers(token: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @staticmethod
    def _check(r: httpx.Response, parse: Callable[[bytes], Any] = json.loads) -> Any:
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        if r.status_code == 204 or not r.content:
            return None
        return parse(r.content)

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
    def __init__(self, server: str | list[str], token: str | None = None, timeout: float = 30,
                 ca_file: str | None = None) -> None:
        self._connect(server, token, timeout, ca_file, httpx.Client)

    def request(self, method: str, path: str, parse: Callable[[bytes], Any] = json.loads, **kw: Any) -> Any:
        failure: Exception | None = None
        order = self._order()
        for i in order:
            try:
                r = self.https[i].request(method, path, **kw)
            except httpx.TransportError as e:
                failure = self._unreachable_or_raise(i, method, e)
                continue
            failure = self._unavailable(i, r, order)
            if failure is None:
                return self._check(r, parse)
        assert failure is not None
        raise failure

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
        return self.request("GET", "/api/v1/snapshot", parse=parse_snapshot)

    def close(self) -> None:
        for h in self.https:
            h.close()


class AsyncTetherClient(_Common):
    def __init__(self, server: str | list[str], token: str | None = None, timeout: float = 10,
                 ca_file: str | None = None) -> None:
        self._connect(server, token, timeout, ca_file, httpx.AsyncClient)

    async def request(self, method: str, path: str, parse: Callable[[bytes], Any] = json.loads, **kw: Any) -> Any:
        """`parse`: the answer's body to its value (`snapshot`: pydantic's parser)."""
        failure: Exception | None = None
        order = self._order()
        for i in order:
            try:
                r = await self.https[i].request(method, path, **kw)
            except httpx.TransportError as e:
                failure = self._unreachable_or_raise(i, method, e)
                continue
            failure = self._unavailable(i, r, order)
            if failure is None:
                return self._check(r, parse)
        assert failure is not None
        raise failure

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
        return await self.request("GET", "/api/v1/snapshot", parse=parse_snapshot)

    async def watch(self, after_revision: int) -> AsyncIterator[dict]:
        """Events after a revision, one dict per line; ends after a `resync` line or when the server
        ends the stream. A stream that breaks, or a server that cannot be reached or answers 503,
        moves to the next server from the last revision delivered (events are never skipped or
        repeated); ServerUnreachable once no server can be reached."""
        last = after_revision
        failures = 0
        while True:
            i = self.current
            try:
                async with self.https[i].stream("GET", "/api/v1/watch", params={"after_revision": last},
                                                timeout=httpx.Timeout(10, read=30)) as r:
                    if r.status_code == 503 and failures + 1 < len(self.servers):
                        await r.aread()
                        failures += 1
                        self.current = (i + 1) % len(self.servers)
                        continue
                    if r.status_code >= 400:
                        await r.aread()
                        raise ApiError(r.status_code, _detail(r))
                    async for line in r.aiter_lines():
                        if line:
                            ev = json.loads(line)
                            if isinstance(ev.get("revision"), int) and ev.get("type") != "resync":
                                last = ev["revision"]
                                failures = 0
                            yield ev
                    return
            except httpx.TransportError as e:
                failures += 1
                if failures >= len(self.servers):
                    raise _unreachable(self.servers[i], e) from e
                self.current = (i + 1) % len(self.servers)

    async def close(self) -> None:
        for h in self.https:
            await h.aclose()
