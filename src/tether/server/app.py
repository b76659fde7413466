"""The FastAPI application: routes, authentication, error shapes, metrics and the GC loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers

from tether.model import Namespace
from tether.server.api import router
from tether.server.auth import OPEN_PATHS, AdminCredential, Credentials, Denied, authorize, bearer
from tether.server.flows import FlowRing
from tether.server.gc import GarbageCollector
from tether.server.ipam import Ipam
from tether.server.leader import Leadership
from tether.server.limits import BodyLimit, Limits, WatchSlots
from tether.server.objects import ApiError, Objects, with_retries
from tether.store.base import Compacted, Conflict, Store, StoreError, Unavailable

log = logging.getLogger(__name__)


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field; remove it (see /openapi.json for the fields this object has)"
        elif err.get("type") == "model_attributes_type" and isinstance(err.get("input"), bytes | str):
            msg = "the body is not a JSON object: send JSON with Content-Type: application/json"
        elif err.get("type") == "json_invalid":
            msg = f"malformed JSON ({err.get('ctx', {}).get('error', 'syntax error')})"
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


class AuthAndMetrics:
    """Authentication, authorization and request metrics as a plain ASGI middleware (Starlette's
    `BaseHTTPMiddleware` costs a task and a stream per request: a fifth of the server's CPU in the
    IPAM storms) that also passes the streaming watch answer straight through. The caller's
    `Identity` goes to the routes in `scope["state"]["tether_identity"]`."""

    def __init__(self, app, *, credentials: Credentials, requests: Counter, latency: Histogram) -> None:
        self.app, self.credentials, self.requests, self.latency = app, credentials, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        status = 500
        try:
            if path not in OPEN_PATHS:
                try:
                    who = await self.credentials.identify(token_of(scope))
                except Denied as e:
                    status = 401
                    await refusal(scope, receive, send, 401, "HTTPUnauthorized", str(e),
                                  {"WWW-Authenticate": "Bearer"})
                    return
                except StoreError as e:
                    status = 503
                    await refusal(scope, receive, send, 503, "HTTPServiceUnavailable",
                                  f"cannot check the credential: the store is unavailable ({e}); retry")
                    return
                why = authorize(who, scope["method"], path)
                if why is not None:
                    status = 403
                    await refusal(scope, receive, send, 403, "HTTPForbidden", why)
                    return
                scope.setdefault("state", {})["tether_identity"] = who

            async def send_status(message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        finally:
            self.requests.labels(scope["method"], str(status)).inc()
            self.latency.observe(time.perf_counter() - start)


def token_of(scope) -> str | None:
    """The bearer token; for the web page (`/ui`) also its cookie or a `?token=` given once."""
    headers = Headers(scope=scope)
    token = bearer(headers)
    if token is None and scope["path"].startswith("/ui"):
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        from tether.server.ui import COOKIE

        jar: SimpleCookie = SimpleCookie()
        jar.load(headers.get("cookie", ""))
        token = jar[COOKIE].value if COOKIE in jar else None
        token = token or (parse_qs(scope.get("query_string", b"").decode()).get("token") or [None])[0]
    return token


async def refusal(scope, receive, send, status: int, neutron_type: str, message: str,
                  headers: dict[str, str] | None = None) -> None:
    body = ({"NeutronError": {"type": neutron_type, "message": message, "detail": ""}}
            if scope["path"].startswith("/v2.0") else {"detail": message})
    await JSONResponse(body, status, headers=headers)(scope, receive, send)


def create_app(
    store: Store,
    *,
    token: str | None,
    service_cidr: str = "10.96.0.0/16",
    service_cidr6: str = "fd96::/112",
    vtep_cidr: str = "169.254.64.0/18",
    dead_host_grace: float = 600.0,
    empty_block_grace: float = 300.0,
    gc_interval: float = 30.0,
    compact_keep: int = 0,
    limits: Limits | None = None,
    ca_pem: bytes | None = None,
    credential: AdminCredential | None = None,
) -> FastAPI:
    """The app over `store`. `token` (tests, one server) or `credential` (a token hash shared through
    the store by every server on it); neither: no authentication. `compact_keep`: revisions of
    history the leader keeps when it compacts the store (0: the store compacts itself, as SQLite does)."""
    if credential is None and token is not None:
        credential = AdminCredential.of_token(token)
    limits = limits or Limits()
    registry = CollectorRegistry()
    requests = Counter("tether_api_requests", "API requests", ["method", "status"], registry=registry)
    latency = Histogram("tether_api_request_seconds", "API request latency", registry=registry)
    ipam = Ipam(store, empty_grace=empty_block_grace)
    objects = Objects(store, ipam, service_cidr=service_cidr, vtep_cidr=vtep_cidr, service_cidr6=service_cidr6)
    leadership = Leadership(store)
    gc = GarbageCollector(objects, dead_host_grace=dead_host_grace, interval=gc_interval, leadership=leadership,
                          compact_keep=compact_keep)
    addresses = Gauge("tether_ipam_addresses_in_use", "Allocated addresses", ["network"], registry=registry)
    blocks_g = Gauge("tether_ipam_blocks", "Claimed IPAM blocks", ["network"], registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ensure_default() -> None:
            if await objects.get(Namespace, "default") is None:
                await objects.upsert(Namespace(name="default", labels={"kubernetes.io/metadata.name": "default"}))

        with contextlib.suppress(StoreError):
            await with_retries(ensure_default)
        tasks = [asyncio.create_task(leadership.run()), asyncio.create_task(gc.run())] if gc_interval > 0 else []
        yield
        app.state.watches.stop_all()
        hub = getattr(app.state, "watch_hub", None)
        if hub is not None:
            await hub.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leadership.resign(), 1)

    app = FastAPI(title="Tether API", version="1", lifespan=lifespan,
                  description="Desired state of a Tether network: hosts, networks, endpoints, policies, services.")
    app.state.objects = objects
    app.state.flows = FlowRing()
    app.state.peers = {}  # host -> its last peer-health report (tether.agent.peers)
    app.state.credentials = Credentials(store, credential)
    app.state.ca_pem = ca_pem
    app.state.gc = gc
    app.state.leadership = leadership
    app.state.limits = limits
    app.state.watches = WatchSlots(limits.max_watches, limits.max_watches_per_client)
    app.include_router(router)
    from tether.server.ui import router as ui_router

    app.include_router(ui_router)
    from tether.server import neutron, neutron_l3, octavia

    app.include_router(octavia.router)  # /v2.0/lbaas, before Neutron's /v2.0/{resource}/... routes
    app.include_router(octavia.amphorae)
    app.include_router(neutron.router)
    app.include_router(neutron_l3.router)
    app.include_router(neutron.fallback)  # last: what no route above answers

    app.add_middleware(BodyLimit, limits=limits)  # inside the token check: no body is read before it
    app.add_middleware(AuthAndMetrics, credentials=app.state.credentials, requests=requests, latency=latency)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc), "errors": jsonable(exc.errors())}, 422)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        """Store failures are answers, not crashes: an exception that reaches uvicorn also closes the
        client's keep-alive connection, and its next request was reset."""
        if isinstance(exc, Conflict):
            return JSONResponse({"detail": f"the store was busy with conflicting writes ({exc}); retry"}, 409)
        if isinstance(exc, Compacted):
            return JSONResponse({"detail": f"{exc}; list again"}, 410)
        if not isinstance(exc, Unavailable):
            log.warning("store error answered 503: %s", exc)
        return JSONResponse({"detail": f"the store is unavailable: {exc}; retry later"}, 503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {exc.__class__.__name__}: {exc}; see the server log"}, 500)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        """200 only when the store takes writes: a linearizable read (quorum) and no alarm."""
        problems_of = getattr(store, "problems", None)
        try:
            problems = await problems_of() if problems_of is not None else []
            if problems_of is None:
                await store.revision()
        except StoreError as e:
            problems = [str(e)]
        body = {"ok": not problems, "leader": leadership.leading}
        if problems:
            return JSONResponse({**body, "problems": problems}, 503, headers={"Retry-After": "1"})
        return JSONResponse(body)

    @app.get("/ca.crt", include_in_schema=False)
    async def ca_certificate() -> Response:
        """The cluster CA, open: a joining host fetches it, then trusts it only if its hash matches
        the pin it was given (`tether host join --ca-hash`)."""
        if ca_pem is None:
            return JSONResponse({"detail": "this server has no CA of its own (operator certificates without "
                                           "--tls-ca); give hosts the CA file with --ca-file"}, 404)
        return Response(ca_pem, media_type="application/x-pem-file")

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> dict:
        from tether.server.neutron import version_document

        # the Neutron version document lets openstack clients discover /v2.0 without Keystone
        return {"name": "tether", "api": "/api/v1", "openapi": "/openapi.json",
                **version_document(str(request.base_url))}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        from tether.model import Block

        per_net: dict[str, list[int]] = {}
        for b in await objects.list(Block):
            c = per_net.setdefault(b.network, [0, 0])
            c[0] += len(b.allocations)
            c[1] += 1
        for net, (n_addr, n_blocks) in per_net.items():
            addresses.labels(net).set(n_addr)
            blocks_g.labels(net).set(n_blocks)
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def jsonable(errors: list) -> list:
    out = []
    for e in errors:
        e = dict(e)
        e.pop("ctx", None)
        e.pop("url", None)
        if "input" in e:
            e["input"] = repr(e["input"])[:200]
        out.append(e)
    return out
