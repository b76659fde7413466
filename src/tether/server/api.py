"""The /api/v1 routes. Thin: parse, call `Objects`, answer; the rules live in objects.py/validation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tether.model import (
    Block,
    Endpoint,
    Host,
    HostStatus,
    Namespace,
    Network,
    NetworkPolicy,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    is_default_group,
)
from tether.server.auth import ADMIN, DOCKER_NETWORK_LABEL, DOCKER_NETWORK_VALUE, HostHasCredential, Identity
from tether.server.fanout import Subscriber, WatchHub
from tether.server.limits import Limits, TooManyWatches, WatchSlots, peer_of
from tether.server.objects import ApiError, Objects, with_retries
from tether.server.validation import check_policy, require_namespace
from tether.server.wire import wire_of
from tether.store.base import Compacted, Conflict

router = APIRouter(prefix="/api/v1")
CREDENTIAL_RECHECK = 5.0  # seconds between checks that a host's watch stream is still authorized
OWN_HOST_ONLY = "a host credential may write only endpoints on its own host"


def objs(request: Request) -> Objects:
    return request.app.state.objects


def dump(obj: Any) -> Any:
    if isinstance(obj, list):
        return [o.model_dump(mode="json") for o in obj]
    return obj.model_dump(mode="json")


def answer(response: Response, obj: Any, created: bool) -> Any:
    response.status_code = 201 if created else 200
    return dump(obj)


def caller(request: Request) -> Identity:
    """Who is calling (set by the authentication middleware; admin when the app runs without it)."""
    return (request.scope.get("state") or {}).get("tether_identity", ADMIN)


def require_own(request: Request, host: str | None, what: str) -> None:
    """403 unless the caller is the admin or the host `host` (the node authorizer's rule)."""
    who = caller(request)
    if who.kind != "admin" and host != who.name:
        raise ApiError(403, f"host {who.name!r} may not write {what} on host {host!r}: {OWN_HOST_ONLY}")


def same_name(path_name: str, body_name: str, kind: str) -> None:
    if path_name != body_name:
        raise ApiError(400, f"{kind} name in the URL ({path_name!r}) differs from the body ({body_name!r})")


def namespaced_reads(kind: type[NetworkPolicy] | type[Service], plural: str) -> None:
    """GET /PLURAL (optionally ?namespace=) and GET /namespaces/NS/PLURAL/NAME of a namespaced kind."""

    async def list_all(request: Request, namespace: str | None = None) -> list[dict]:
        return dump(await objs(request).list(kind, f"{namespace}/" if namespace else ""))

    async def get_one(ns: str, name: str, request: Request) -> dict:
        return dump(await objs(request).must(kind, f"{ns}/{name}"))

    router.add_api_route(f"/{plural}", list_all, methods=["GET"], name=f"list_{plural}")
    router.add_api_route(f"/namespaces/{{ns}}/{plural}/{{name}}", get_one, methods=["GET"], name=f"get_{plural}")


async def namespaced_body(request: Request, ns: str, name: str, obj: NetworkPolicy | Service, what: str) -> Objects:
    """A PUT of a namespaced object: the URL's name and namespace are the body's, and the namespace
    exists. The objects to write it with."""
    same_name(name, obj.name, what)
    if obj.namespace != ns:
        raise ApiError(400, f"namespace in the URL ({ns!r}) differs from the body ({obj.namespace!r})")
    o = objs(request)
    await require_namespace(o, ns)
    return o


# --- hosts -----------------------------------------------------------------------------------------

class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl: float = Field(default=15, gt=0, le=3600)
    applied_revision: int | None = Field(default=None, ge=0)  # the agent's last applied replica revision


@router.get("/hosts")
async def list_hosts(request: Request) -> list[dict]:
    o = objs(request)
    hosts = await o.observed_hosts()
    live = await o.live_hosts()
    out = dump(hosts)
    for h in out:
        h["alive"] = h["name"] in live
    return out


@router.get("/hosts/{name}")
async def get_host(name: str, request: Request) -> dict:
    o = objs(request)
    return dump(o.observed_host(await o.must(Host, name)))


@router.put("/hosts/{name}")
async def put_host(name: str, host: Host, request: Request, response: Response) -> dict:
    same_name(name, host.name, "host")
    old = await objs(request).get(Host, name)
    host.status = old.status if old is not None else HostStatus()  # only PUT .../status writes it
    obj, created = await objs(request).register_host(host)
    return answer(response, obj, created)


@router.put("/hosts/{name}/status")
async def put_host_status(name: str, status: HostStatus, request: Request) -> dict:
    """The host's agent reports what it could not apply (quarantined objects, failed kernel
    operations); only this field of the host changes."""
    o = objs(request)

    async def attempt() -> Host:
        host = await o.must(Host, name)
        host.status = status
        return await o.replace(host, host.revision)

    return dump(await with_retries(attempt))


@router.post("/hosts/{name}/heartbeat")
async def heartbeat(name: str, request: Request, body: HeartbeatBody | None = None) -> dict:
    body = body or HeartbeatBody()
    await objs(request).heartbeat(name, body.ttl, body.applied_revision)
    return {"ok": True}


async def own_report(request: Request, name: str, what: str) -> Objects:
    """A report an agent pushes about its own host (flows, path health): only that host (or the
    admin) may, and the host must exist. The objects to store it with."""
    require_own(request, name, what)
    o = objs(request)
    await o.must(Host, name)
    return o


class FlowPush(BaseModel):
    """Records as they are, and connection records grouped by what they share (`tether.flows.pack`:
    `{"common": {...}, "columns": [...], "rows": [[...], ...]}`, checked when ingested)."""

    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    groups: list[Any] = Field(default_factory=list, max_length=10_000)


@router.post("/hosts/{name}/flows")
async def push_flows(name: str, body: FlowPush, request: Request) -> dict:
    """A host's agent pushes the flows it recorded since its last push (`tether.flows`)."""
    o = await own_report(request, name, "flows")
    return {"kept": await request.app.state.flows.ingest(o, name, body.records, body.groups)}


class PeerReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peers: list[dict[str, Any]] = Field(default_factory=list, max_length=5000)


@router.post("/hosts/{name}/peers")
async def push_peers(name: str, body: PeerReport, request: Request) -> dict:
    """A host's agent reports how it reaches every peer (`tether.agent.peers`); kept in memory."""
    await own_report(request, name, "peer health")
    request.app.state.peers[name] = {"reported_at": time.time(), "peers": body.peers}
    return {"ok": True}


@router.get("/peers")
async def get_peers(request: Request) -> dict:
    """Per host, its last peer report (reachability, latency, path MTU, problems) and its age."""
    now_ = time.time()
    return {h: {**r, "age_s": round(now_ - r["reported_at"], 1)} for h, r in request.app.state.peers.items()}


@router.get("/flows")
async def get_flows(request: Request, after: int = 0, limit: int = Query(200, ge=1, le=5000),
                    src: str | None = Query(None, alias="from"), dst: str | None = Query(None, alias="to"),
                    verdict: str | None = Query(None, pattern="^(allow|deny)$"),
                    wait: float = Query(0, ge=0, le=30)) -> dict:
    """Recorded flows, both ends named; `after` (the last `seq` seen) and `wait` (seconds to hold
    the request while nothing new matches) make `tether flows --follow`."""
    ring = request.app.state.flows
    deadline = time.monotonic() + wait
    while True:
        changed = ring.changed
        out = ring.query(after, limit, src, dst, verdict)
        left = deadline - time.monotonic()
        if out or left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), left)
    last = max((r["seq"] for r in ring.records), default=0)
    return {"flows": out, "last": max(last, after)}


@router.delete("/hosts/{name}", status_code=204)
async def delete_host(name: str, request: Request) -> None:
    await objs(request).delete_host(name)
    await revoke(request, name)


async def revoke(request: Request, name: str) -> bool:
    revoked = await request.app.state.credentials.revoke_host(name)
    request.app.state.watches.stop_holder(name)
    return revoked


@router.delete("/hosts/{name}/credential")
async def revoke_host_credential(name: str, request: Request) -> dict:
    """Lock a host out at once: its next call gets 401 and its watch streams end."""
    return {"host": name, "revoked": await revoke(request, name)}


# --- joining ---------------------------------------------------------------------------------------

class BootstrapBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl: float = Field(default=1800, ge=1, le=7 * 86400, description="seconds the token is valid")
    description: str = Field(default="", max_length=200)


@router.post("/bootstrap-tokens", status_code=201)
async def create_bootstrap_token(request: Request, body: BootstrapBody | None = None) -> dict:
    from tether.trust import ca_hash

    body = body or BootstrapBody()
    token, expires = await request.app.state.credentials.create_bootstrap(body.ttl, body.description)
    ca = request.app.state.ca_pem
    return {"token": token, "expires": expires, "ca_hash": ca_hash(ca) if ca else None}


class JoinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str


@router.post("/join", status_code=201)
async def join(body: JoinBody, request: Request) -> dict:
    """Exchange a bootstrap token for this host's own credential (shown once, stored only hashed)."""
    who = caller(request)
    try:
        credential = await request.app.state.credentials.issue_host(body.host, by=str(who))
    except HostHasCredential as e:
        raise ApiError(409, str(e)) from None
    return {"host": body.host, "credential": credential}


# --- networks --------------------------------------------------------------------------------------

@router.get("/networks")
async def list_networks(request: Request) -> list[dict]:
    return dump(await objs(request).list(Network))


@router.get("/networks/{name}")
async def get_network(name: str, request: Request) -> dict:
    return dump(await objs(request).must(Network, name))


def require_subnet(net: Network) -> None:
    if not net.subnets:
        raise ApiError(422, "subnets: a network needs at least one subnet, e.g. [{\"cidr\": \"10.1.0.0/16\"}]")


@router.post("/networks", status_code=201)
async def create_network(net: Network, request: Request) -> dict:
    require_subnet(net)
    obj, _ = await objs(request).put_network(net, create_only=True)
    return dump(obj)


async def require_docker_network(request: Request, name: str, net: Network | None) -> None:
    """403 unless the caller is the admin, or a host creating (`net`) or deleting (None) a network
    labelled as the Docker driver's: what `docker network create/rm` needs and no more. A host may not
    change an existing network, create one it does not label as Docker's, nor an external one."""
    who = caller(request)
    if who.kind == "admin":
        return
    label = f"{DOCKER_NETWORK_LABEL}={DOCKER_NETWORK_VALUE}"
    if net is not None:
        if await objs(request).get(Network, name) is not None:
            raise ApiError(403, f"host {who.name!r} may not change network {name!r}: a host credential only creates "
                                "networks for Docker; change it with the admin token")
        if net.labels.get(DOCKER_NETWORK_LABEL) != DOCKER_NETWORK_VALUE or net.external or net.project:
            raise ApiError(403, f"host {who.name!r} may create only Docker networks (labelled {label}, not "
                                "external, no project); create other networks with the admin token")
        return
    existing = await objs(request).get(Network, name)
    if existing is not None and existing.labels.get(DOCKER_NETWORK_LABEL) != DOCKER_NETWORK_VALUE:
        raise ApiError(403, f"host {who.name!r} may delete only networks the Docker driver created (labelled "
                            f"{label}); network {name!r} is not one: delete it with the admin token")


@router.put("/networks/{name}")
async def put_network(name: str, net: Network, request: Request, response: Response) -> dict:
    same_name(name, net.name, "network")
    require_subnet(net)
    await require_docker_network(request, name, net)
    # a host only creates: a concurrent create by another host is a 409, never an update
    obj, created = await objs(request).put_network(net, create_only=caller(request).kind != "admin")
    return answer(response, obj, created)


@router.delete("/networks/{name}", status_code=204)
async def delete_network(name: str, request: Request) -> None:
    await require_docker_network(request, name, None)
    await objs(request).delete_network(name)


# --- endpoints -------------------------------------------------------------------------------------

@router.get("/endpoints")
async def list_endpoints(
    request: Request,
    network: str | None = None,
    host: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
    owner_container_id: str | None = None,
) -> list[dict]:
    o = objs(request)
    eps = await o.list(Endpoint)
    eps = [e for e in eps if (network is None or e.network == network) and (host is None or e.host == host)
           and (namespace is None or e.namespace == namespace) and (name is None or e.name == name)
           and (owner_container_id is None or e.owner.container_id == owner_container_id)]
    return dump(await o.observed(eps))


@router.get("/endpoints/{ep_id}")
async def get_endpoint(ep_id: str, request: Request) -> dict:
    """The endpoint; one today's validators refuse is shown as stored, with `invalid` saying why."""
    o = objs(request)
    try:
        return dump((await o.observed([await o.must(Endpoint, ep_id)]))[0])
    except ValidationError:
        found = await o.stored_as_is(Endpoint, ep_id)
        if found is None:  # rewritten meanwhile
            raise ApiError(409, f"endpoint {ep_id!r} changed while it was read; try again") from None
        ep, problem = found
        return {**ep.model_dump(mode="json", warnings=False), "invalid": problem}


@router.post("/endpoints", status_code=201)
async def create_endpoint(ep: Endpoint, request: Request, response: Response) -> dict:
    require_own(request, ep.host, f"endpoint {ep.name!r}")
    o = objs(request)
    if await o.get(Namespace, ep.namespace) is None and ep.namespace != "default":
        await require_namespace(o, ep.namespace)
    obj, created = await o.create_endpoint(ep)
    return answer(response, obj, created)


@router.patch("/endpoints/{ep_id}")
async def patch_endpoint(ep_id: str, request: Request, changes: dict[str, Any] = Body(...)) -> dict:
    if caller(request).kind != "admin":
        ep = await objs(request).must(Endpoint, ep_id)
        require_own(request, ep.host, f"endpoint {ep_id!r}")
        require_own(request, changes.get("host", ep.host), f"endpoint {ep_id!r}")
    return dump(await objs(request).update_endpoint(ep_id, changes))


@router.delete("/endpoints/by-handle/{handle:path}")
async def release_by_handle(handle: str, request: Request) -> dict:
    o = objs(request)
    ep = await o.endpoint_by_handle(handle)
    if ep is not None:
        require_own(request, ep.host, f"endpoint {ep.id!r}")
        await o.delete_endpoint(ep.id)
    return {"released": ep is not None, "endpoint": dump(ep) if ep else None}


@router.delete("/endpoints/{ep_id}", status_code=204)
async def delete_endpoint(ep_id: str, request: Request) -> None:
    if caller(request).kind != "admin":
        ep = await objs(request).get(Endpoint, ep_id)
        require_own(request, ep.host if ep else caller(request).name, f"endpoint {ep_id!r}")
    if await objs(request).delete_endpoint(ep_id) is None:
        raise ApiError(404, f"endpoint {ep_id!r} not found")


# --- namespaces ------------------------------------------------------------------------------------

@router.get("/namespaces")
async def list_namespaces(request: Request) -> list[dict]:
    return dump(await objs(request).list(Namespace))


@router.get("/namespaces/{name}")
async def get_namespace(name: str, request: Request) -> dict:
    return dump(await objs(request).must(Namespace, name))


@router.put("/namespaces/{name}")
async def put_namespace(name: str, ns: Namespace, request: Request, response: Response) -> dict:
    same_name(name, ns.name, "namespace")
    ns.labels.setdefault("kubernetes.io/metadata.name", name)
    who = caller(request)
    if who.kind != "admin":  # a pod's CNI ADD in a namespace nobody made yet: create it bare, nothing more
        if ns.labels != {"kubernetes.io/metadata.name": name}:
            raise ApiError(403, f"host {who.name!r} may only create namespace {name!r} without labels; "
                                "the admin sets namespace labels")
        try:
            return answer(response, await objs(request).create(ns), True)
        except Conflict:  # made meanwhile (another pod's ADD): the host may not change it, only use it
            return answer(response, await objs(request).must(Namespace, name), False)
    obj, created = await objs(request).upsert(ns)
    return answer(response, obj, created)


@router.delete("/namespaces/{name}", status_code=204)
async def delete_namespace(name: str, request: Request) -> None:
    o = objs(request)
    ns = await o.must(Namespace, name)
    eps = [e for e in await o.list(Endpoint) if e.namespace == name]
    if eps:
        raise ApiError(409, f"namespace {name!r} still has {len(eps)} endpoints; delete them first")
    await o.remove(ns)


# --- network policies ------------------------------------------------------------------------------

namespaced_reads(NetworkPolicy, "networkpolicies")


@router.put("/namespaces/{ns}/networkpolicies/{name}")
async def put_policy(ns: str, name: str, pol: NetworkPolicy, request: Request, response: Response) -> dict:
    o = await namespaced_body(request, ns, name, pol, "network policy")
    check_policy(pol)
    obj, created = await o.upsert(pol)
    return answer(response, obj, created)


@router.delete("/namespaces/{ns}/networkpolicies/{name}", status_code=204)
async def delete_policy(ns: str, name: str, request: Request) -> None:
    o = objs(request)
    await o.remove(await o.must(NetworkPolicy, f"{ns}/{name}"))


# --- security groups -------------------------------------------------------------------------------

@router.get("/securitygroups")
async def list_sgs(request: Request) -> list[dict]:
    return dump(await objs(request).list(SecurityGroup))


@router.get("/securitygroups/{sg_id}")
async def get_sg(sg_id: str, request: Request) -> dict:
    return dump(await find_sg(objs(request), sg_id))


async def find_sg(o: Objects, ref: str) -> SecurityGroup:
    """A security group by id, or by name when the name is unique."""
    sg = await o.get(SecurityGroup, ref)
    if sg is not None:
        return sg
    named = [s for s in await o.list(SecurityGroup) if s.name == ref]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ApiError(409, f"{len(named)} security groups are named {ref!r}; use the id")
    raise ApiError(404, f"security group {ref!r} not found")


async def check_sg_refs(o: Objects, sg: SecurityGroup) -> None:
    for r in sg.rules:
        if r.remote_group_id and r.remote_group_id != sg.id and await o.get(SecurityGroup, r.remote_group_id) is None:
            raise ApiError(400, f"rule {r.id}: remote group {r.remote_group_id!r} does not exist")


@router.post("/securitygroups", status_code=201)
async def create_sg(sg: SecurityGroup, request: Request) -> dict:
    o = objs(request)
    await check_sg_refs(o, sg)
    return dump(await with_retries(lambda: o.create(sg)))


@router.put("/securitygroups/{sg_id}")
async def put_sg(sg_id: str, sg: SecurityGroup, request: Request, response: Response) -> dict:
    if sg.id != sg_id:
        raise ApiError(400, f"security group id in the URL ({sg_id!r}) differs from the body ({sg.id!r})")
    o = objs(request)
    await check_sg_refs(o, sg)
    obj, created = await o.upsert(sg)
    return answer(response, obj, created)


@router.post("/securitygroups/{sg_id}/rules", status_code=201)
async def add_sg_rule(sg_id: str, rule: SecurityGroupRule, request: Request) -> dict:
    o = objs(request)

    async def attempt() -> SecurityGroup:
        sg = await find_sg(o, sg_id)
        sg.rules.append(rule)
        await check_sg_refs(o, sg)
        return await o.replace(sg, sg.revision)

    await with_retries(attempt)
    return dump(rule)


@router.delete("/securitygroups/{sg_id}/rules/{rule_id}", status_code=204)
async def delete_sg_rule(sg_id: str, rule_id: str, request: Request) -> None:
    o = objs(request)

    async def attempt() -> None:
        sg = await find_sg(o, sg_id)
        if not any(r.id == rule_id for r in sg.rules):
            raise ApiError(404, f"rule {rule_id!r} not found in security group {sg.name!r}")
        sg.rules = [r for r in sg.rules if r.id != rule_id]
        await o.replace(sg, sg.revision)

    await with_retries(attempt)


@router.delete("/securitygroups/{sg_id}", status_code=204)
async def delete_sg(sg_id: str, request: Request) -> None:
    o = objs(request)
    sg = await find_sg(o, sg_id)
    if is_default_group(sg):
        raise ApiError(409, f"security group {sg.id!r} is the default group of project {sg.project or '(none)'!r}, "
                            "which cannot be deleted (as in Neutron); remove its rules instead")
    users = [e.name for e in await o.list(Endpoint) if sg.id in e.security_groups]
    if users:
        raise ApiError(409, f"security group {sg.name!r} is used by {len(users)} endpoints ({', '.join(users[:5])}); "
                            "detach it first")
    await o.remove(sg)


# --- services --------------------------------------------------------------------------------------

async def require_host_service(request: Request, store_name: str, svc: Service | None) -> None:
    """403 unless the admin, or a host writing (`svc`) or deleting (None) a service that publishes on
    itself only (`host` is the caller) with explicit backends that are its own endpoints: Docker's -p
    and CNI hostPort, with the host's credential; other hosts' traffic is not its to steer."""
    who = caller(request)
    if who.kind == "admin":
        return
    o = objs(request)
    old = await o.get(Service, store_name)
    if old is not None and old.host != who.name:
        raise ApiError(403, f"host {who.name!r} may not change service {store_name!r}: it is not published on "
                            f"{who.name!r} only; use the admin token")
    if svc is None:
        return
    why = None
    if svc.host != who.name or svc.type != "NodePort" or svc.selector or not svc.backends:
        why = f"it must publish on host {who.name!r} only (host, type NodePort) with explicit backends, no selector"
    else:
        for b in svc.backends:
            ep = await o.get(Endpoint, b.endpoint) if b.endpoint else None
            if ep is None or ep.host != who.name or b.ip not in ep.ips:
                why = f"backend {b.ip} is not an endpoint of host {who.name!r}"
                break
    if why:
        raise ApiError(403, f"host {who.name!r} may not write service {store_name!r}: {why}; use the admin token")

namespaced_reads(Service, "services")


@router.put("/namespaces/{ns}/services/{name}")
async def put_service(ns: str, name: str, svc: Service, request: Request, response: Response) -> dict:
    o = await namespaced_body(request, ns, name, svc, "service")
    if svc.network and await o.get(Network, svc.network) is None:
        raise ApiError(400, f"network {svc.network!r} does not exist")
    await require_host_service(request, f"{ns}/{name}", svc)
    obj, created = await o.put_service(svc)
    return answer(response, obj, created)


@router.delete("/namespaces/{ns}/services/{name}", status_code=204)
async def delete_service(ns: str, name: str, request: Request) -> None:
    await require_host_service(request, f"{ns}/{name}", None)
    await objs(request).delete_service(ns, name)


# --- blocks, snapshot, watch -----------------------------------------------------------------------

PROGRAMMABLE = {"Endpoint": Endpoint, "NetworkPolicy": NetworkPolicy, "SecurityGroup": SecurityGroup,
                "Service": Service, "Network": Network, "Namespace": Namespace}


@router.get("/programming/{kind}/{ref:path}")
async def get_programming(kind: str, ref: str, request: Request) -> dict:
    """Whether every host that must act on an object has applied its current revision
    (`tether.server.programming`): `tether get KIND NAME` and `tether wait --for programmed`."""
    from tether.server.programming import programming

    cls = PROGRAMMABLE.get(kind)
    if cls is None:
        raise ApiError(404, f"no programming status for kind {kind!r}; use one of: {', '.join(PROGRAMMABLE)}")
    o = objs(request)
    obj = await find_sg(o, ref) if cls is SecurityGroup else await o.get(cls, ref)
    if obj is None:
        raise ApiError(404, f"{kind} {ref!r} not found")
    hosts = await o.observed_hosts()
    return programming(obj, hosts, await o.live_hosts(), o.written_at(obj)).as_dict()


@router.get("/blocks")
async def list_blocks(request: Request, network: str | None = None) -> list[dict]:
    return dump(await objs(request).list(Block, f"{network}:" if network else ""))


@router.get("/snapshot")
async def snapshot(request: Request) -> Response:
    """Every object at one revision, `{"revision": R, "objects": [{"kind": K, "object": O}, ...]}`:
    each object encoded once for every agent (tether.server.wire), the body sent in pieces."""
    body = await wire_of(request.app, objs(request).store).snapshot()
    return StreamingResponse(body.chunks(), media_type="application/json",
                             headers={"content-length": str(body.length)})


class WatchResponse(StreamingResponse):
    """A watch stream that gives its slot back however it ends (even if it never started)."""

    def __init__(self, lines: AsyncIterator[bytes], release: Any) -> None:
        super().__init__(lines, media_type="application/x-ndjson")
        self.release = release

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def watch_hub(app: Any, store: Any) -> WatchHub:
    """The app's one store watch, shared by its watch streams (tether.server.fanout)."""
    hub = getattr(app.state, "watch_hub", None)
    if hub is None or hub.store is not store:
        from tether.model import PREFIX

        hub = app.state.watch_hub = WatchHub(store, PREFIX, wire_of(app, store).event_line)
    return hub


def resync_line(**why: Any) -> bytes:
    """`relist`: the client must list again (the history it needs is gone); false: it may watch
    again from `revision`, the last one it was sent (one missed event never costs a full list)."""
    return (json.dumps({"type": "resync", **why}) + "\n").encode()


async def store_confirmed(app: Any, store: Any, timeout: float) -> bool:
    """The store answered a linearizable read within the last second (one read shared by every
    watch stream): a bookmark says "you are in sync", which a store without quorum cannot say.
    (During an etcd quorum loss the streams had gone on sending bookmarks at a frozen revision.)"""
    st = app.state
    if time.monotonic() - getattr(st, "store_ok_at", -1e9) < 1.0:
        return True
    probe = getattr(st, "store_probe", None)
    if probe is None or probe.done():
        probe = st.store_probe = asyncio.ensure_future(store.revision())
        probe.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        await asyncio.wait_for(asyncio.shield(probe), timeout)
    except Exception:  # noqa: BLE001 - no answer: no bookmark, the client sees the silence
        return False
    st.store_ok_at = time.monotonic()
    return True


@router.get("/watch")
async def watch(request: Request, after_revision: int = Query(..., ge=0),
                bookmark_interval: float = Query(5.0, ge=1.0, le=3600.0,
                                                 description="seconds between bookmarks on a quiet stream")):
    """Events after `after_revision`, one JSON line each. Bounded: a watch that starts too far
    behind, or whose client does not keep up, gets a `resync` line and ends (list, then watch again)."""
    store = objs(request).store
    limits: Limits = request.app.state.limits
    slots: WatchSlots = request.app.state.watches
    from tether.model import PREFIX

    head = await store.revision()
    if head - after_revision > limits.watch_max_replay:
        return Response(resync_line(revision=head, relist=True, reason=f"revision {after_revision} is more than "
                                    f"{limits.watch_max_replay} revisions behind the head ({head}); list, then "
                                    "watch from the list's revision"), media_type="application/x-ndjson")
    if after_revision > head:
        return Response(resync_line(revision=head, relist=True, reason=f"revision {after_revision} is ahead of the "
                                    f"store's head ({head}): the store was restored or replaced; list, then watch "
                                    "from the list's revision"), media_type="application/x-ndjson")
    try:
        who = caller(request)
        watcher = slots.acquire(peer_of(request.scope), who.name if who.kind == "host" else "")
    except TooManyWatches as e:
        raise ApiError(e.status, e.detail) from None
    cap, stall = limits.watch_buffer, limits.watch_stall
    credentials = request.app.state.credentials
    wire = wire_of(request.app, store)
    hub = watch_hub(request.app, store)

    async def lines() -> AsyncIterator[bytes]:
        sub = Subscriber(cap, stall, watcher.wake)
        sub.progress = after_revision
        last = after_revision
        checked = time.monotonic()

        async def still_valid() -> bool:
            """A host's credential revoked through another server ends its streams here too, within
            CREDENTIAL_RECHECK seconds (through this server: at once, WatchSlots.stop_holder)."""
            nonlocal checked
            if not watcher.holder or time.monotonic() - checked < CREDENTIAL_RECHECK:
                return True
            checked = time.monotonic()
            return await credentials.host_valid(watcher.holder)

        async def replay() -> None:
            """Events the hub's ring no longer holds, read for this stream alone, until the hub
            holds everything after what was read; then the hub queues the rest."""
            try:
                if await hub.ensure_started() and hub.subscribe(sub, after_revision):
                    return
                read = after_revision
                async for ev in store.watch(PREFIX, after_revision):
                    if ev.type == "progress":
                        sub.progress = max(sub.progress, ev.revision)
                        continue
                    # joined only between revisions: a transaction's events share one
                    if ev.revision != read and hub.subscribe(sub, read):
                        return
                    while sub.size and sub.size > cap and sub.overflow is None:  # full: wait for the client
                        sub.room.clear()
                        try:
                            async with asyncio.timeout(stall):
                                await sub.room.wait()
                        except TimeoutError:
                            sub.cut(f"this watcher fell behind: {sub.size} bytes of events waited over {stall:g} s "
                                    "(--watch-stall); watch again from the revision given", pending=ev.revision)
                    if sub.overflow is not None:
                        return
                    sub.push(ev.revision, wire.event_line(ev))
                    read = ev.revision
            except Exception as e:  # noqa: BLE001 - Compacted or a store failure: the client resyncs
                sub.fail(e)

        task = asyncio.create_task(replay())
        try:
            while True:
                if not sub.items and sub.overflow is None and not watcher.stopping:
                    watcher.wake.clear()
                    try:
                        async with asyncio.timeout(bookmark_interval):
                            await watcher.wake.wait()
                    except TimeoutError:
                        if not await still_valid():
                            return
                        # nothing is queued: all up to `progress` (and the hub's revision, once joined) was sent
                        delivered = max(last, sub.progress, sub.hub.revision if sub.hub is not None else 0)
                        if await store_confirmed(request.app, store, bookmark_interval):
                            yield (json.dumps({"type": "bookmark", "revision": delivered}) + "\n").encode()
                    continue
                if watcher.stopping:
                    return  # the server is stopping: the stream just ends, the client reconnects
                if not sub.items:
                    yield resync_line(revision=sub.resume_at if sub.resume_at >= 0 else last, reason=sub.overflow,
                                      relist=False)
                    return
                item = sub.take()
                if isinstance(item, Compacted):
                    yield resync_line(compact_revision=item.compact_revision, relist=True)
                    return
                if isinstance(item, Exception):
                    yield resync_line(revision=last, error=str(item), relist=False)
                    return
                # what is queued goes out as one chunk: a send costs ~90 us through the ASGI stack,
                # per stream, and one write is often several events (an endpoint and its block)
                batch = []
                while True:
                    last, line = item
                    if line is not None:
                        batch.append(line)
                    if not sub.items or not isinstance(sub.items[0], tuple) or len(batch) >= 64:
                        break
                    item = sub.take()
                if not await still_valid():
                    return
                if batch:
                    yield batch[0] if len(batch) == 1 else b"".join(batch)
        finally:
            sub.close()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    return WatchResponse(lines(), lambda: slots.release(watcher))
