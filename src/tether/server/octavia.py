"""The Octavia-compatible `/v2.0/lbaas` API (load balancers) over Tether services.

The `openstack loadbalancer ...` commands (python-octaviaclient) and openstacksdk's load-balancer
proxy use it without Keystone, on the same endpoint as the Neutron API. A load balancer is a VIP
port on a subnet (an Endpoint named `octavia-lb-<id>` with no host: IPAM holds the address, nothing
is plugged) plus a tree of listeners, pools and members kept under one store key per load balancer.
Every listener with a default pool is one Tether Service (`octavia-<listener id>`, namespace
`default`) whose cluster IP is the VIP (`Service.load_balancer`), whose port is the listener's and
whose manual backends are the pool's enabled members: so Neutron ports (VMs) and pods answer one
VIP together, with the datapath of every other service (DNAT on the client's host).

Never accepted silently: what Tether does not do (HTTP/HTTPS/SCTP listeners, TLS, L7 policies,
LEAST_CONNECTIONS and SOURCE_IP_PORT, session persistence, weights, backup members, health
monitors, flavors, QoS) is refused with Octavia's 400 `{"faultcode", "faultstring", "debuginfo"}`
naming the attribute, before anything is written. Provisioning is synchronous: objects are ACTIVE
when the request returns. Members of one pool share one `protocol_port` (a service has one target
port). ROUND_ROBIN spreads new connections evenly at random over the members; SOURCE_IP keeps a
client on one member (client-IP affinity).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from tether.model import Endpoint, Network, Owner, Service, ServiceBackend, ServicePort, new_id
from tether.server.objects import ApiError, Objects, octavia_key
from tether.store.base import Compare, Conflict, Delete, Put

LB_KEY = octavia_key("")
NAMESPACE = "default"
PROTOCOLS = {"TCP", "UDP"}
ALGORITHMS = {"ROUND_ROBIN", "SOURCE_IP"}
ALL_PROTOCOLS = {"HTTP", "HTTPS", "TCP", "UDP", "SCTP", "TERMINATED_HTTPS", "PROMETHEUS", "PROXY", "PROXYV2"}


class OctaviaError(Exception):
    """An error answered in Octavia's (WSME) body shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        fault = "Client" if self.status < 500 else "Server"
        return JSONResponse({"faultcode": fault, "faultstring": self.message, "debuginfo": None}, self.status)


def bad(message: str) -> OctaviaError:
    return OctaviaError(400, message)


class OctaviaRoute(APIRoute):
    """Answers every failure of an /lbaas route in Octavia's error shape, whatever raised it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except OctaviaError as e:
                return e.response()
            except ApiError as e:
                return OctaviaError(e.status, e.detail).response()
            except (ValidationError, ValueError) as e:
                return OctaviaError(400, f"Invalid input: {e}").response()

        return wrapped


router = APIRouter(prefix="/v2.0/lbaas", route_class=OctaviaRoute)


def objs(request: Request) -> Objects:
    return request.app.state.objects


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "")


# --- request checks ------------------------------------------------------------------------------

# attribute -> the values Tether accepts for it (a callable that says whether a value is what Tether
# does anyway); any other value is refused naming the attribute
def _none_or_empty(v: Any) -> bool:
    return v in (None, [], {}, "")


COMMON = {"name", "description", "admin_state_up", "tags", "project_id", "tenant_id"}
LB_ATTRS = COMMON | {"vip_subnet_id", "vip_network_id", "vip_address", "vip_port_id", "provider"}
LB_REFUSED: dict[str, Callable[[Any], bool]] = {
    "flavor_id": _none_or_empty, "vip_qos_policy_id": _none_or_empty, "availability_zone": _none_or_empty,
    "additional_vips": _none_or_empty, "listeners": _none_or_empty, "pools": _none_or_empty,
    "vip_sg_ids": _none_or_empty, "vip_vnic_type": lambda v: v in (None, "normal"),
}
LISTENER_DEFAULTS = {"connection_limit": -1, "timeout_client_data": 50000, "timeout_member_connect": 5000,
                     "timeout_member_data": 50000, "timeout_tcp_inspect": 0}
LISTENER_ATTRS = COMMON | {"protocol", "protocol_port", "loadbalancer_id", "default_pool_id"}
LISTENER_REFUSED: dict[str, Callable[[Any], bool]] = {
    **{k: (lambda d: lambda v: v is None or v == d)(default) for k, default in LISTENER_DEFAULTS.items()},
    **{k: _none_or_empty for k in ("default_tls_container_ref", "sni_container_refs", "insert_headers",
                                   "l7policies", "default_pool", "client_ca_tls_container_ref",
                                   "client_authentication", "client_crl_container_ref", "allowed_cidrs",
                                   "tls_ciphers", "tls_versions", "alpn_protocols", "hsts_max_age",
                                   "hsts_include_subdomains", "hsts_preload")},
}
POOL_ATTRS = COMMON | {"protocol", "lb_algorithm", "listener_id", "loadbalancer_id"}
POOL_REFUSED: dict[str, Callable[[Any], bool]] = {
    **{k: _none_or_empty for k in ("session_persistence", "healthmonitor", "members", "tls_container_ref",
                                   "ca_tls_container_ref", "crl_container_ref", "tls_ciphers", "tls_versions",
                                   "alpn_protocols")},
    "tls_enabled": lambda v: v in (None, False),
}
MEMBER_ATTRS = COMMON | {"address", "protocol_port", "subnet_id"}
MEMBER_REFUSED: dict[str, Callable[[Any], bool]] = {
    "weight": lambda v: v in (None, 1), "backup": lambda v: v in (None, False),
    "monitor_address": _none_or_empty, "monitor_port": _none_or_empty,
    "vnic_type": lambda v: v in (None, "normal"),
}
WHY = {
    "weight": "every member gets an equal share of new connections (weight 1)",
    "session_persistence": "use lb_algorithm SOURCE_IP to keep a client on one member",
    "allowed_cidrs": "restrict clients with security groups on the members instead",
}


async def body_of(request: Request, resource: str) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise bad("Invalid input: the request body is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get(resource), dict):
        raise bad(f"Invalid input: the request body has no '{resource}' object")
    return data[resource]


def check_body(body: dict[str, Any], known: set[str], refused: dict[str, Callable[[Any], bool]],
               what: str) -> None:
    """Unknown attributes and values of attributes Tether does not implement are refused by name."""
    for attr in sorted(body):
        if attr in refused:
            if not refused[attr](body[attr]):
                why = WHY.get(attr, "Tether does not implement it")
                raise bad(f"Invalid input for field/attribute {attr}. Value: {str(body[attr])[:80]}. "
                          f"Not supported by Tether's {what}: {why}.")
        elif attr not in known:
            raise bad(f"Invalid input for field/attribute {attr}. Unknown attribute for {what}.")


def text(body: dict[str, Any], attr: str, default: str = "") -> str:
    v = body.get(attr, default)
    if v is None:
        return default
    if not isinstance(v, str) or len(v) > 255:
        raise bad(f"Invalid input for field/attribute {attr}. Value: {str(v)[:80]}. A string of at most 255 "
                  "characters is expected.")
    return v


def flag(body: dict[str, Any], attr: str, default: bool = True) -> bool:
    v = body.get(attr, default)
    if not isinstance(v, bool):
        raise bad(f"Invalid input for field/attribute {attr}. Value: {str(v)[:80]}. true or false is expected.")
    return v


def tags(body: dict[str, Any], default: list[str] | None = None) -> list[str]:
    v = body.get("tags", default or [])
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, str) and 0 < len(t) <= 255 for t in v):
        raise bad(f"Invalid input for field/attribute tags. Value: {str(v)[:80]}. A list of strings is expected.")
    return list(v)


def port_of(body: dict[str, Any], attr: str) -> int:
    v = body.get(attr)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise bad(f"Invalid input for field/attribute {attr}. Value: {str(v)[:80]}. A port 1-65535 is expected.")
    return v


def protocol_of(body: dict[str, Any], what: str) -> str:
    p = body.get("protocol")
    if p not in ALL_PROTOCOLS:
        raise bad(f"Invalid input for field/attribute protocol. Value: {str(p)[:80]}. Value should be one of: "
                  f"{', '.join(sorted(ALL_PROTOCOLS))}")
    if p not in PROTOCOLS:
        raise bad(f"Invalid input for field/attribute protocol. Value: {p}. Tether's {what} supports TCP and UDP "
                  "only (no HTTP/TLS/SCTP proxying: Tether balances connections in the kernel).")
    return p


def common_fields(body: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    old = old or {}
    return {"name": text(body, "name", old.get("name", "")),
            "description": text(body, "description", old.get("description", "")),
            "admin_state_up": flag(body, "admin_state_up", old.get("admin_state_up", True)),
            "tags": tags(body, old.get("tags"))}


# --- the stored tree -----------------------------------------------------------------------------

class Tree:
    """One load balancer with its listeners, pools and members (dicts in Octavia's field names)."""

    def __init__(self, data: dict[str, Any], revision: int = 0) -> None:
        self.lb: dict[str, Any] = data["lb"]
        self.listeners: dict[str, dict] = data.get("listeners", {})
        self.pools: dict[str, dict] = data.get("pools", {})
        self.members: dict[str, dict] = data.get("members", {})
        self.revision = revision

    def dump(self) -> bytes:
        return json.dumps({"lb": self.lb, "listeners": self.listeners, "pools": self.pools,
                           "members": self.members}).encode()

    @property
    def key(self) -> str:
        return LB_KEY + self.lb["id"]


async def trees(o: Objects) -> list[Tree]:
    listed = await o.store.list(LB_KEY)
    return [Tree(json.loads(kv.value), kv.mod_revision) for kv in listed.items]


async def tree_of(o: Objects, *, lb: str | None = None, listener: str | None = None,
                  pool: str | None = None) -> Tree:
    for t in await trees(o):
        if (lb and t.lb["id"] == lb) or (listener and listener in t.listeners) or (pool and pool in t.pools):
            return t
    what, ident = ("Load Balancer", lb) if lb else ("Listener", listener) if listener else ("Pool", pool)
    raise OctaviaError(404, f"{what} {ident} not found.")


def services_of(t: Tree) -> list[Service]:
    """The Tether services a load balancer stands for: one per listener with a default pool."""
    out = []
    vip = t.lb["vip_address"]
    for lst in t.listeners.values():
        pool = t.pools.get(lst.get("default_pool_id") or "")
        if pool is None:
            continue
        up = t.lb["admin_state_up"] and lst["admin_state_up"] and pool["admin_state_up"]
        members = [m for m in t.members.values() if m["pool_id"] == pool["id"] and m["admin_state_up"]]
        target = members[0]["protocol_port"] if members else None
        out.append(Service(
            name=f"octavia-{lst['id']}", namespace=NAMESPACE, cluster_ip=vip, load_balancer=t.lb["id"],
            ip_families=["IPv6" if ":" in vip else "IPv4"],
            labels={"octavia.openstack.org/loadbalancer": t.lb["id"], "octavia.openstack.org/listener": lst["id"]},
            ports=[ServicePort(protocol=lst["protocol"], port=lst["protocol_port"], target_port=target)],
            backends=[ServiceBackend(ip=m["address"], endpoint=m.get("endpoint")) for m in members] if up else [],
            session_affinity="ClientIP" if pool["lb_algorithm"] == "SOURCE_IP" else "None"))
    return out


async def sync_services(o: Objects, t: Tree | None, lb_id: str) -> None:
    """Make the services of load balancer `lb_id` those of `t` (none when it is deleted)."""
    want = {s.store_name(): s for s in (services_of(t) if t is not None else [])}
    have = {s.store_name(): s for s in await o.list(Service) if s.load_balancer == lb_id}
    for name, svc in want.items():
        old = have.get(name)
        if old is None or old.model_dump(exclude={"id", "created_at", "revision"}) != svc.model_dump(
                exclude={"id", "created_at", "revision"}):
            await o.put_service(svc)
    for name, svc in have.items():
        if name not in want:
            await o.delete_service(svc.namespace, svc.name)


async def save(o: Objects, t: Tree) -> None:
    """Write the tree (only if nobody changed it since it was read), then its services. Members'
    endpoints are looked up again first: a pod or port made after its member, or one deleted since."""
    t.lb["updated_at"] = now()
    holders = {(ep.network, ip): ep.id for ep in await o.list(Endpoint) for ip in ep.ips}
    by_subnet = {s.id: n.name for n in await o.list(Network) for s in n.subnets}
    for m in t.members.values():
        net = by_subnet.get(m.get("subnet_id") or "")
        m["endpoint"] = next((eid for (n, ip), eid in holders.items()
                              if ip == m["address"] and (net is None or n == net)), None)
    try:
        await o.store.txn([Compare(t.key, t.revision)], [Put(t.key, t.dump())])
    except Conflict:
        raise OctaviaError(409, f"Load Balancer {t.lb['id']} is immutable and cannot be updated: it changed "
                                "while this request ran; retry.") from None
    await sync_services(o, t, t.lb["id"])


def refs(ids: list[str]) -> list[dict[str, str]]:
    return [{"id": i} for i in ids]


def filtered(request: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Octavia list filters: each query parameter matches the field of that name; `fields=` keeps those."""
    q = request.query_params
    for key in set(q.keys()) - {"fields", "limit", "marker", "sort", "page_reverse"}:
        wanted = q.getlist(key)
        items = [i for i in items if key in i and (str(i[key]).lower() if isinstance(i[key], bool)
                                                   else str(i[key])) in [w.lower() if isinstance(i[key], bool)
                                                                         else w for w in wanted]]
    fields = q.getlist("fields")
    if fields:
        items = [{k: v for k, v in i.items() if k in fields} for i in items]
    return items


# --- views ---------------------------------------------------------------------------------------

def status_of(up: bool) -> str:
    return "ONLINE" if up else "OFFLINE"


def lb_view(t: Tree) -> dict[str, Any]:
    return {**t.lb, "operating_status": status_of(t.lb["admin_state_up"]), "provisioning_status": "ACTIVE",
            "listeners": refs(list(t.listeners)), "pools": refs(list(t.pools))}


def listener_view(t: Tree, lst: dict) -> dict[str, Any]:
    return {**lst, "loadbalancers": refs([t.lb["id"]]), "provisioning_status": "ACTIVE",
            "operating_status": status_of(lst["admin_state_up"] and t.lb["admin_state_up"]),
            **LISTENER_DEFAULTS, "default_tls_container_ref": None, "sni_container_refs": [], "insert_headers": {},
            "l7policies": [], "allowed_cidrs": None, "tls_ciphers": None, "tls_versions": None,
            "alpn_protocols": None, "client_ca_tls_container_ref": None, "client_authentication": "NONE",
            "client_crl_container_ref": None}


def pool_view(t: Tree, pool: dict) -> dict[str, Any]:
    listeners = [i for i, lst in t.listeners.items() if lst.get("default_pool_id") == pool["id"]]
    return {**pool, "loadbalancers": refs([t.lb["id"]]), "listeners": refs(listeners),
            "members": refs([i for i, m in t.members.items() if m["pool_id"] == pool["id"]]),
            "healthmonitor_id": None, "session_persistence": None, "provisioning_status": "ACTIVE",
            "operating_status": status_of(pool["admin_state_up"]), "tls_enabled": False,
            "tls_container_ref": None, "ca_tls_container_ref": None, "crl_container_ref": None,
            "tls_ciphers": None, "tls_versions": None, "alpn_protocols": None}


def member_view(m: dict) -> dict[str, Any]:
    shown = {k: v for k, v in m.items() if k not in ("pool_id", "endpoint")}
    return {**shown, "weight": 1, "backup": False, "monitor_address": None, "monitor_port": None,
            "provisioning_status": "ACTIVE", "operating_status": "NO_MONITOR" if m["admin_state_up"] else "OFFLINE",
            "vnic_type": "normal"}


# --- load balancers ------------------------------------------------------------------------------

async def vip_network(o: Objects, body: dict[str, Any]) -> tuple[Network, str | None]:
    """The network of the VIP and the subnet asked for (by vip_subnet_id or vip_network_id)."""
    if body.get("vip_port_id"):
        raise bad("Invalid input for field/attribute vip_port_id. Tether creates the VIP port itself: give "
                  "vip_subnet_id (and vip_address) instead.")
    sub_id, net_id = body.get("vip_subnet_id"), body.get("vip_network_id")
    if not sub_id and not net_id:
        raise bad("Validation failure: VIP must contain one of: vip_port_id, vip_network_id, vip_subnet_id.")
    for net in await o.list(Network):
        if sub_id and any(s.id == sub_id for s in net.subnets):
            if net_id and net.id != net_id:
                raise bad(f"Validation failure: subnet {sub_id} is not in network {net_id}.")
            return net, sub_id
        if not sub_id and net.id == net_id:
            return net, None
    raise bad(f"Validation failure: {'Subnet ' + sub_id if sub_id else 'Network ' + str(net_id)} not found.")


def vip_address(body: dict[str, Any], net: Network, sub_id: str | None) -> list[str]:
    """The VIP asked for (in the subnet), or nothing when IPAM may choose; several subnets of the VIP's
    family need an explicit vip_address (Tether's IPAM picks one address per family)."""
    subs = [s for s in net.subnets if sub_id is None or s.id == sub_id]
    if not subs:
        raise bad(f"Validation failure: network {net.id} has no subnet for the VIP; create one first.")
    asked = body.get("vip_address")
    if asked:
        try:
            a = ipaddress.ip_address(str(asked))
        except ValueError:
            raise bad(f"Invalid input for field/attribute vip_address. Value: {str(asked)[:60]}. Not an IP "
                      "address.") from None
        if not any(a in ipaddress.ip_network(s.cidr) for s in subs):
            raise bad(f"Validation failure: vip_address {a} is not in subnet {sub_id or 'of network ' + net.id}.")
        return [str(a)]
    version = ipaddress.ip_network(subs[0].cidr).version
    same = [s for s in net.subnets if ipaddress.ip_network(s.cidr).version == version]
    if len(same) > 1:
        raise bad(f"Validation failure: network {net.id} has {len(same)} IPv{version} subnets and Tether picks one "
                  "address per family; give vip_address.")
    return []


@router.get("/loadbalancers")
async def list_lbs(request: Request) -> dict:
    return {"loadbalancers": filtered(request, [lb_view(t) for t in await trees(objs(request))]),
            "loadbalancers_links": []}


@router.get("/loadbalancers/{lb_id}")
async def get_lb(lb_id: str, request: Request) -> dict:
    return {"loadbalancer": lb_view(await tree_of(objs(request), lb=lb_id))}


@router.get("/loadbalancers/{lb_id}/status")
async def lb_status(lb_id: str, request: Request) -> dict:
    t = await tree_of(objs(request), lb=lb_id)
    lv = lb_view(t)
    listeners = []
    for lst in t.listeners.values():
        pools = [p for p in t.pools.values() if p["id"] == lst.get("default_pool_id")]
        listeners.append({"id": lst["id"], "name": lst["name"], "provisioning_status": "ACTIVE",
                          "operating_status": listener_view(t, lst)["operating_status"],
                          "pools": [{"id": p["id"], "name": p["name"], "provisioning_status": "ACTIVE",
                                     "operating_status": status_of(p["admin_state_up"]),
                                     "members": [{k: member_view(m)[k] for k in ("id", "name", "address",
                                                 "protocol_port", "provisioning_status", "operating_status")}
                                                 for m in t.members.values() if m["pool_id"] == p["id"]]}
                                    for p in pools]})
    return {"statuses": {"loadbalancer": {"id": lv["id"], "name": lv["name"], "provisioning_status": "ACTIVE",
                                          "operating_status": lv["operating_status"], "listeners": listeners}}}


@router.post("/loadbalancers", status_code=201)
async def create_lb(request: Request) -> dict:
    body = await body_of(request, "loadbalancer")
    check_body(body, LB_ATTRS, LB_REFUSED, "load balancer")
    if body.get("provider") not in (None, "tether", "amphora", "octavia"):
        raise bad(f"Invalid input for field/attribute provider. Value: {str(body['provider'])[:60]}. Provider "
                  "'tether' is the only one here.")
    o = objs(request)
    fields = common_fields(body)
    net, sub_id = await vip_network(o, body)
    ips = vip_address(body, net, sub_id)
    lb_id = new_id()
    port = Endpoint(name=f"octavia-lb-{lb_id}", network=net.name, ips=ips, port_security=False,
                    owner=Owner(type="api", device_id=f"lb-{lb_id}", device_owner="Octavia"),
                    description=f"VIP port of load balancer {lb_id}")
    port, _ = await o.create_endpoint(port)
    if not port.ips:
        await o.delete_endpoint(port.id)
        raise bad(f"Validation failure: no address could be given to the VIP on network {net.id}.")
    vip = port.ips[0]
    sub = next(s for s in net.subnets if ipaddress.ip_address(vip) in ipaddress.ip_network(s.cidr))
    project = body.get("project_id") or body.get("tenant_id") or net.project or ""
    stamp = now()
    lb = {"id": lb_id, **fields, "project_id": project, "tenant_id": project, "provider": "tether",
          "vip_address": vip, "vip_port_id": port.id, "vip_subnet_id": sub.id, "vip_network_id": net.id,
          "vip_qos_policy_id": None, "flavor_id": None, "availability_zone": None, "additional_vips": [],
          "vip_vnic_type": "normal", "created_at": stamp, "updated_at": stamp}
    t = Tree({"lb": lb})
    try:
        await o.store.txn([Compare(t.key, 0)], [Put(t.key, t.dump())])
    except BaseException:
        await o.delete_endpoint(port.id)
        raise
    return {"loadbalancer": lb_view(t)}


@router.put("/loadbalancers/{lb_id}")
async def update_lb(lb_id: str, request: Request) -> dict:
    body = await body_of(request, "loadbalancer")
    check_body(body, COMMON, {"vip_qos_policy_id": _none_or_empty}, "load balancer update")
    o = objs(request)
    t = await tree_of(o, lb=lb_id)
    t.lb.update(common_fields(body, t.lb))
    await save(o, t)
    return {"loadbalancer": lb_view(t)}


@router.delete("/loadbalancers/{lb_id}", status_code=204)
async def delete_lb(lb_id: str, request: Request) -> Response:
    o = objs(request)
    t = await tree_of(o, lb=lb_id)
    cascade = request.query_params.get("cascade", "").lower() in ("true", "1", "yes")
    if (t.listeners or t.pools) and not cascade:
        raise bad(f"Cannot delete Load Balancer {lb_id} - it has children")
    await sync_services(o, None, lb_id)
    await o.store.txn([Compare(t.key, t.revision)], [Delete(t.key)])
    await o.delete_endpoint(t.lb["vip_port_id"])
    return Response(status_code=204)


# --- listeners -----------------------------------------------------------------------------------

def pool_for_listener(t: Tree, pool_id: Any, protocol: str, listener_id: str) -> str | None:
    if not pool_id:
        return None
    pool = t.pools.get(str(pool_id))
    if pool is None:
        raise OctaviaError(404, f"Pool {pool_id} not found.")
    if pool["protocol"] != protocol:
        raise bad(f"Validation failure: The pool protocol '{pool['protocol']}' is invalid while the listener "
                  f"protocol is '{protocol}'.")
    if any(lst.get("default_pool_id") == pool_id and i != listener_id for i, lst in t.listeners.items()):
        raise OctaviaError(409, f"Pool {pool_id} is already the default pool of another listener.")
    return str(pool_id)


@router.get("/listeners")
async def list_listeners(request: Request) -> dict:
    items = [listener_view(t, lst) for t in await trees(objs(request)) for lst in t.listeners.values()]
    return {"listeners": filtered(request, items), "listeners_links": []}


@router.get("/listeners/{listener_id}")
async def get_listener(listener_id: str, request: Request) -> dict:
    t = await tree_of(objs(request), listener=listener_id)
    return {"listener": listener_view(t, t.listeners[listener_id])}


@router.get("/listeners/{listener_id}/stats")
async def listener_stats(listener_id: str, request: Request) -> dict:
    await tree_of(objs(request), listener=listener_id)
    raise OctaviaError(404, "Statistics are not implemented by Tether: see `tether flows` for traffic.")


@router.post("/listeners", status_code=201)
async def create_listener(request: Request) -> dict:
    body = await body_of(request, "listener")
    check_body(body, LISTENER_ATTRS, LISTENER_REFUSED, "listener")
    protocol = protocol_of(body, "listener")
    port = port_of(body, "protocol_port")
    o = objs(request)
    t = await tree_of(o, lb=str(body.get("loadbalancer_id") or "") or "-")
    if any(lst["protocol_port"] == port and lst["protocol"] == protocol for lst in t.listeners.values()):
        raise OctaviaError(409, f"Another Listener on this Load Balancer is already using protocol_port {port} "
                                f"and protocol {protocol}")
    lid = new_id()
    stamp = now()
    lst = {"id": lid, **common_fields(body), "protocol": protocol, "protocol_port": port,
           "loadbalancer_id": t.lb["id"], "project_id": t.lb["project_id"], "tenant_id": t.lb["project_id"],
           "default_pool_id": pool_for_listener(t, body.get("default_pool_id"), protocol, lid),
           "created_at": stamp, "updated_at": stamp}
    t.listeners[lid] = lst
    await save(o, t)
    return {"listener": listener_view(t, lst)}


@router.put("/listeners/{listener_id}")
async def update_listener(listener_id: str, request: Request) -> dict:
    body = await body_of(request, "listener")
    check_body(body, COMMON | {"default_pool_id"}, LISTENER_REFUSED, "listener update")
    o = objs(request)
    t = await tree_of(o, listener=listener_id)
    lst = t.listeners[listener_id]
    lst.update(common_fields(body, lst))
    if "default_pool_id" in body:
        lst["default_pool_id"] = pool_for_listener(t, body["default_pool_id"], lst["protocol"], listener_id)
    lst["updated_at"] = now()
    await save(o, t)
    return {"listener": listener_view(t, lst)}


@router.delete("/listeners/{listener_id}", status_code=204)
async def delete_listener(listener_id: str, request: Request) -> Response:
    o = objs(request)
    t = await tree_of(o, listener=listener_id)
    del t.listeners[listener_id]
    await save(o, t)
    return Response(status_code=204)


# --- pools ---------------------------------------------------------------------------------------

def algorithm_of(body: dict[str, Any]) -> str:
    alg = body.get("lb_algorithm")
    known = {"ROUND_ROBIN", "LEAST_CONNECTIONS", "SOURCE_IP", "SOURCE_IP_PORT"}
    if alg not in known:
        raise bad(f"Invalid input for field/attribute lb_algorithm. Value: {str(alg)[:60]}. Value should be one of: "
                  f"{', '.join(sorted(known))}")
    if alg not in ALGORITHMS:
        raise bad(f"Invalid input for field/attribute lb_algorithm. Value: {alg}. Tether supports ROUND_ROBIN "
                  "(each new connection to a random member, evenly) and SOURCE_IP (a client stays on one member).")
    return alg


@router.get("/pools")
async def list_pools(request: Request) -> dict:
    items = [pool_view(t, p) for t in await trees(objs(request)) for p in t.pools.values()]
    return {"pools": filtered(request, items), "pools_links": []}


@router.get("/pools/{pool_id}")
async def get_pool(pool_id: str, request: Request) -> dict:
    t = await tree_of(objs(request), pool=pool_id)
    return {"pool": pool_view(t, t.pools[pool_id])}


@router.post("/pools", status_code=201)
async def create_pool(request: Request) -> dict:
    body = await body_of(request, "pool")
    check_body(body, POOL_ATTRS, POOL_REFUSED, "pool")
    protocol = protocol_of(body, "pool")
    alg = algorithm_of(body)
    o = objs(request)
    listener_id, lb_id = body.get("listener_id"), body.get("loadbalancer_id")
    if not listener_id and not lb_id:
        raise bad("Validation failure: A pool must be created with a listener_id or a loadbalancer_id.")
    t = await (tree_of(o, listener=str(listener_id)) if listener_id else tree_of(o, lb=str(lb_id)))
    if lb_id and t.lb["id"] != lb_id:
        raise bad(f"Validation failure: listener {listener_id} is not on load balancer {lb_id}.")
    pid = new_id()
    stamp = now()
    pool = {"id": pid, **common_fields(body), "protocol": protocol, "lb_algorithm": alg,
            "loadbalancer_id": t.lb["id"], "project_id": t.lb["project_id"], "tenant_id": t.lb["project_id"],
            "created_at": stamp, "updated_at": stamp}
    t.pools[pid] = pool
    if listener_id:
        lst = t.listeners[str(listener_id)]
        if lst.get("default_pool_id"):
            raise OctaviaError(409, f"Listener {listener_id} already has default pool {lst['default_pool_id']}.")
        lst["default_pool_id"] = pool_for_listener(t, pid, lst["protocol"], str(listener_id))
    await save(o, t)
    return {"pool": pool_view(t, pool)}


@router.put("/pools/{pool_id}")
async def update_pool(pool_id: str, request: Request) -> dict:
    body = await body_of(request, "pool")
    check_body(body, COMMON | {"lb_algorithm"}, POOL_REFUSED, "pool update")
    o = objs(request)
    t = await tree_of(o, pool=pool_id)
    pool = t.pools[pool_id]
    pool.update(common_fields(body, pool))
    if "lb_algorithm" in body:
        pool["lb_algorithm"] = algorithm_of(body)
    pool["updated_at"] = now()
    await save(o, t)
    return {"pool": pool_view(t, pool)}


@router.delete("/pools/{pool_id}", status_code=204)
async def delete_pool(pool_id: str, request: Request) -> Response:
    o = objs(request)
    t = await tree_of(o, pool=pool_id)
    del t.pools[pool_id]
    t.members = {i: m for i, m in t.members.items() if m["pool_id"] != pool_id}
    for lst in t.listeners.values():
        if lst.get("default_pool_id") == pool_id:
            lst["default_pool_id"] = None
    await save(o, t)
    return Response(status_code=204)


# --- members -------------------------------------------------------------------------------------

async def check_member_subnet(o: Objects, address: str, subnet_id: str | None) -> None:
    """A member's subnet exists and holds its address (`save` ties the member to the endpoint, port
    or pod, that holds the address, so the service skips it while that endpoint is not ready)."""
    if not subnet_id:
        return
    sub = next((s for n in await o.list(Network) for s in n.subnets if s.id == subnet_id), None)
    if sub is None:
        raise bad(f"Validation failure: Subnet {subnet_id} not found.")
    if ipaddress.ip_address(address) not in ipaddress.ip_network(sub.cidr):
        raise bad(f"Validation failure: member address {address} is not in subnet {subnet_id}.")


@router.get("/pools/{pool_id}/members")
async def list_members(pool_id: str, request: Request) -> dict:
    t = await tree_of(objs(request), pool=pool_id)
    items = [member_view(m) for m in t.members.values() if m["pool_id"] == pool_id]
    return {"members": filtered(request, items), "members_links": []}


@router.get("/pools/{pool_id}/members/{member_id}")
async def get_member(pool_id: str, member_id: str, request: Request) -> dict:
    t = await tree_of(objs(request), pool=pool_id)
    m = t.members.get(member_id)
    if m is None or m["pool_id"] != pool_id:
        raise OctaviaError(404, f"Member {member_id} not found.")
    return {"member": member_view(m)}


@router.post("/pools/{pool_id}/members", status_code=201)
async def create_member(pool_id: str, request: Request) -> dict:
    body = await body_of(request, "member")
    check_body(body, MEMBER_ATTRS, MEMBER_REFUSED, "member")
    try:
        address = str(ipaddress.ip_address(str(body.get("address"))))
    except ValueError:
        raise bad(f"Invalid input for field/attribute address. Value: {str(body.get('address'))[:60]}. Not an IP "
                  "address.") from None
    port = port_of(body, "protocol_port")
    o = objs(request)
    t = await tree_of(o, pool=pool_id)
    siblings = [m for m in t.members.values() if m["pool_id"] == pool_id]
    if any(m["address"] == address and m["protocol_port"] == port for m in siblings):
        raise OctaviaError(409, f"Duplicate member with IP address {address} and port {port} in pool {pool_id}.")
    if siblings and siblings[0]["protocol_port"] != port:
        raise bad(f"Invalid input for field/attribute protocol_port. Value: {port}. The members of a pool share one "
                  f"port in Tether (a service has one target port): this pool's members use "
                  f"{siblings[0]['protocol_port']}.")
    if (":" in address) != (":" in t.lb["vip_address"]):
        raise bad(f"Validation failure: member address {address} is not of the VIP's IP version.")
    await check_member_subnet(o, address, body.get("subnet_id") or None)
    mid = new_id()
    stamp = now()
    m = {"id": mid, **common_fields(body), "address": address, "protocol_port": port,
         "subnet_id": body.get("subnet_id") or None, "pool_id": pool_id, "project_id": t.lb["project_id"],
         "tenant_id": t.lb["project_id"], "endpoint": None,
         "created_at": stamp, "updated_at": stamp}
    t.members[mid] = m
    await save(o, t)
    return {"member": member_view(m)}


@router.put("/pools/{pool_id}/members")
async def batch_members(pool_id: str, request: Request) -> dict:
    await tree_of(objs(request), pool=pool_id)
    raise bad("Batch member update is not implemented by Tether: create and delete members one by one.")


@router.put("/pools/{pool_id}/members/{member_id}")
async def update_member(pool_id: str, member_id: str, request: Request) -> dict:
    body = await body_of(request, "member")
    check_body(body, COMMON, MEMBER_REFUSED, "member update")
    o = objs(request)
    t = await tree_of(o, pool=pool_id)
    m = t.members.get(member_id)
    if m is None or m["pool_id"] != pool_id:
        raise OctaviaError(404, f"Member {member_id} not found.")
    m.update(common_fields(body, m))
    m["updated_at"] = now()
    await save(o, t)
    return {"member": member_view(m)}


@router.delete("/pools/{pool_id}/members/{member_id}", status_code=204)
async def delete_member(pool_id: str, member_id: str, request: Request) -> Response:
    o = objs(request)
    t = await tree_of(o, pool=pool_id)
    if member_id not in t.members or t.members[member_id]["pool_id"] != pool_id:
        raise OctaviaError(404, f"Member {member_id} not found.")
    del t.members[member_id]
    await save(o, t)
    return Response(status_code=204)


# --- what Tether does not do ---------------------------------------------------------------------

@router.get("/healthmonitors")
async def list_healthmonitors() -> dict:
    return {"healthmonitors": [], "healthmonitors_links": []}


@router.get("/healthmonitors/{hm_id}")
async def get_healthmonitor(hm_id: str) -> dict:
    raise OctaviaError(404, f"Health Monitor {hm_id} not found.")


@router.post("/healthmonitors")
async def create_healthmonitor() -> dict:
    raise bad("Invalid input for field/attribute type. Health monitors are not implemented by Tether: a member "
              "that is a Tether port or pod leaves the pool while its endpoint is not ready, but Tether sends no "
              "probes. Create the pool without a health monitor.")


@router.get("/l7policies")
async def list_l7policies() -> dict:
    return {"l7policies": [], "l7policies_links": []}


@router.post("/l7policies")
async def create_l7policy() -> dict:
    raise bad("Invalid input for field/attribute action. L7 policies are not implemented by Tether: listeners are "
              "TCP or UDP only.")


@router.get("/providers")
async def list_providers() -> dict:
    return {"providers": [{"name": "tether", "description": "Tether services: kernel DNAT on the client's host"}]}


@router.get("/flavors")
async def list_flavors() -> dict:
    return {"flavors": [], "flavors_links": []}  # none exist: a load balancer naming one is refused


@router.get("/availabilityzones")
async def list_availability_zones() -> dict:
    return {"availabilityzones": [], "availabilityzones_links": []}


NOT_SERVED = ("Tether's Octavia API serves load balancers (create, show, list, set, delete, status), listeners, "
              "pools and members; {what} is not implemented.")


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def not_served(rest: str) -> dict:
    """Stats, failover, quotas, flavor profiles, ...: a 404 that says what is served, not a bare one."""
    raise OctaviaError(404, NOT_SERVED.format(what=f"/v2.0/lbaas/{rest[:80]}"))


amphorae = APIRouter(prefix="/v2.0/octavia", route_class=OctaviaRoute)


@amphorae.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def no_amphorae(rest: str) -> dict:
    raise OctaviaError(404, NOT_SERVED.format(what=f"/v2.0/octavia/{rest[:80]} (there are no amphorae: Tether "
                                                   "balances in the kernel of each client's host)"))
