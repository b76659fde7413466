"""The Neutron-compatible `/v2.0` API: a translation layer over the same objects as `/api/v1`.

A Neutron network *is* a Tether Network (its subnets are the network's subnets), a port is an
Endpoint and a security group is a SecurityGroup, so whatever either API writes the other reads,
and the agents plug it. Field names, filters (`?name=`, `?network_id=`, `fields=`), status codes
and the error body `{"NeutronError": {"type", "message", "detail"}}` follow Neutron, so the
`openstack` CLI and openstacksdk work against it without Keystone (token via `X-Auth-Token`).

Security groups as in Neutron: every project has a `default` group (ingress only from its members,
all egress), created on its first network, port or group list, which cannot be deleted or renamed; a
port created without `security_groups` is put in it; a port with port security on and no group
passes nothing (`Endpoint.port_security`).

Never accepted silently: an attribute Neutron defines that Tether does not implement is refused
with a 400 naming it (`NOT_IMPLEMENTED`) before anything is stored. Names are free text: one that
is not a DNS label is shown as given (`display_name`) and keys the object by a derived label.
Deliberate differences: fixed IPs are chosen per address family (a `subnet_id` without
`ip_address` is refused where it would not pick what was asked); a port's project is its network's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from tether.calc.names import netns_problem, neutron_mac, random_neutron_mac, vif_name
from tether.model import (
    DEFAULT_GROUP,
    DNS_LABEL,
    VNI,
    AddressPair,
    Endpoint,
    Network,
    Obj,
    Owner,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
    check_tags,
    default_group_id,
    is_default_group,
    new_id,
)
from tether.server.objects import ApiError, Objects, with_retries

T = TypeVar("T", bound=Obj)

DEFAULT_MTU = 1450
PROTOCOLS = {"1": "icmp", "6": "tcp", "17": "udp", "58": "icmpv6", "132": "sctp", "ipv6-icmp": "icmpv6"}
LIST_CONTROL = {"fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"}


class NeutronError(Exception):
    """An error answered in Neutron's body shape; `type` is Neutron's exception class name."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message

    def response(self) -> JSONResponse:
        return neutron_error(self.status, self.type, self.message)


def neutron_error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"NeutronError": {"type": type_, "message": message, "detail": ""}}, status)


def bad_request(message: str) -> NeutronError:
    return NeutronError(400, "HTTPBadRequest", message)


def _describe(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "Invalid input: " + "; ".join(parts)


class NeutronRoute(APIRoute):
    """Answers every failure of a /v2.0 route in Neutron's error shape, whatever raised it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except NeutronError as e:
                return e.response()
            except ApiError as e:
                return neutron_error(e.status, _api_error_type(e), e.detail)
            except (ValidationError, RequestValidationError) as e:
                return neutron_error(400, "HTTPBadRequest", _describe(e))
            except ValueError as e:
                return neutron_error(400, "HTTPBadRequest", str(e))

        return wrapped


def _api_error_type(e: ApiError) -> str:
    if e.status == 404:
        return "HTTPNotFound"
    if e.status == 409:
        return "IpAddressAlreadyAllocated" if "already in use" in e.detail else "Conflict"
    if e.status == 400:
        return "HTTPBadRequest"
    return "HTTPInternalServerError" if e.status >= 500 else "NeutronException"


router = APIRouter(prefix="/v2.0", route_class=NeutronRoute)
# what no route of /v2.0 answers (included last by the app, after neutron_l3's routes)
fallback = APIRouter(prefix="/v2.0", route_class=NeutronRoute)


def objs(request: Request) -> Objects:
    return request.app.state.objects


# --- request helpers -------------------------------------------------------------------------------

async def body_of(request: Request, resource: str) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise bad_request("Malformed request body: the body is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get(resource), dict):
        raise bad_request(f"Unable to find '{resource}' in request body")
    return data[resource]


def check_attrs(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"Unrecognized attribute(s) '{', '.join(unknown)}'")


# Attributes Neutron defines that Tether does not implement: accepted only at the value that means
# "not used" (what Neutron shows by default), refused with a 400 naming them otherwise, before
# anything is stored, so no request is half done or silently ignored.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "shared": ((False,), "networks are not shared between projects in Tether (RBAC is not implemented)"),
    "provider:network_type": (("vxlan",), "Tether carries every network over VXLAN (or routed 'direct' hosts); "
                                          "no VLAN, flat or GRE segments"),
    "provider:physical_network": ((), "there are no physical networks (provider VLAN/flat) in Tether"),
    "availability_zone_hints": (([],), "availability zones are not implemented"),
    "is_default": ((False,), "default external networks (auto-allocated topology) are not implemented"),
    "subnetpool_id": ((), "subnet pools are not implemented: give a cidr"),
    "prefixlen": ((), "subnet pools are not implemented: give a cidr"),
    "use_default_subnetpool": ((False,), "subnet pools are not implemented: give a cidr"),
    "segment_id": ((), "routed network segments are not implemented"),
    "service_types": (([],), "subnet service types are not implemented"),
    "dns_publish_fixed_ip": ((False,), "publishing fixed IPs to an external DNS service is not implemented"),
    "binding:vnic_type": (("normal",), "only 'normal' (tap/veth) ports exist: no SR-IOV, macvtap or "
                                       "vhost-user"),
    "qos_policy_id": ((), "QoS policies are not implemented"),
    "propagate_uplink_status": ((False,), "uplink status propagation is not implemented"),
    "numa_affinity_policy": ((), "NUMA affinity policies are not implemented"),
    "extra_dhcp_opts": (([],), "extra DHCP options are not implemented"),
    "stateful": ((True,), "stateless security groups are not implemented (every group is stateful)"),
    "remote_address_group_id": ((), "address groups are not implemented: use remote_ip_prefix"),
}


def check_implemented(body: dict[str, Any], attrs: set[str]) -> None:
    """400 naming the first attribute of `attrs` whose value asks for what Tether does not do
    (None, the attribute's "not used" value, is always accepted)."""
    for attr in sorted(attrs & set(body)):
        accepted, why = NOT_IMPLEMENTED[attr]
        value = body[attr]
        if value is None or value in accepted:
            continue
        if isinstance(value, str) and value.lower() in ("false", "true") and \
                (value.lower() == "true") in [a for a in accepted if isinstance(a, bool)]:
            continue
        raise NeutronError(400, "HTTPBadRequest", f"Invalid input for {attr}. Reason: {str(value)[:60]!r} is not "
                                                  f"supported: {why}. Leave {attr} out.")


def bool_of(body: dict[str, Any], attr: str) -> bool | None:
    """A boolean attribute (Neutron also takes "true"/"false"), None when absent or null."""
    value = body.get(attr)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_request(f"Invalid input for {attr}. Reason: '{str(value)[:40]}' is not a valid boolean value.")


def text_of(body: dict[str, Any], attr: str) -> str:
    value = body.get(attr)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(f"Invalid input for {attr}. Reason: '{str(value)[:40]}' is not a valid string.")
    if len(value) > 255:
        raise bad_request(f"Invalid input for {attr}. Reason: '{value[:40]}...' exceeds maximum length of 255.")
    return value


def tags_of(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise bad_request("Invalid input for tags. Reason: a list of strings is expected.")
    try:
        return check_tags(value)
    except ValueError as e:
        raise bad_request(f"Invalid input for tags. Reason: {e}.") from None


def label_of(name: str, fallback: str) -> str:
    """The DNS label Tether keys an object by, derived from a free-text Neutron name ("My Net" ->
    "my-net-1a2b3c4d"): lower case, runs of other characters as '-', the id's first 8 characters
    appended so two names that fold to the same label stay apart."""
    if DNS_LABEL.match(name):
        return name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50].strip("-")
    return f"{slug}-{fallback[-8:]}" if slug else fallback


def names_of(body_name: Any, fallback: str, what: str) -> tuple[str, str | None]:
    """(Tether name, display name) of a Neutron name: a DNS label is used as it is; other free text
    is shown as given and keyed by a derived label."""
    name = text_of({"name": body_name}, "name") if body_name is not None else ""
    if not name:
        return fallback, None
    label = label_of(name, fallback)
    return label, (None if label == name else name)


def filtered(request: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neutron list semantics: each query parameter filters on the field of that name (repeated
    values mean any of them); `fields=` keeps only those fields (plus nothing else)."""
    q = request.query_params
    for key in set(q.keys()) - LIST_CONTROL:
        wanted = q.getlist(key)
        items = [i for i in items if _matches(i, key, wanted)]
    fields = q.getlist("fields")
    if fields:
        items = [{k: v for k, v in i.items() if k in fields} for i in items]
    return items


def _matches(item: dict[str, Any], key: str, wanted: list[str]) -> bool:
    if key in ("tags", "tags-any", "not-tags", "not-tags-any"):  # Neutron's tag filters, comma-separated
        have = set(item.get("tags", []))
        asked = {t for w in wanted for t in w.split(",") if t}
        hit = asked <= have if key in ("tags", "not-tags") else bool(asked & have)
        return hit != key.startswith("not-")
    if key == "fixed_ips":  # ?fixed_ips=ip_address=10.0.0.5 or subnet_id=...
        for w in wanted:
            k, _, v = w.partition("=")
            if not any(str(f.get(k)) == v for f in item.get("fixed_ips", [])):
                return False
        return True
    if key not in item:
        return False
    value = item[key]
    if isinstance(value, list):
        return any(w in [str(x) for x in value] for w in wanted)
    if isinstance(value, bool):
        return str(value).lower() in [w.lower() for w in wanted]
    if value is None:
        return any(w in ("", "None", "null") for w in wanted)
    return str(value) in wanted


def project_of(body: dict[str, Any]) -> str | None:
    return body.get("project_id") or body.get("tenant_id") or None


def stamps(obj: Any) -> dict[str, Any]:
    created = obj.created_at.isoformat(timespec="seconds").replace("+00:00", "Z") \
        if isinstance(obj.created_at, datetime) else str(obj.created_at)
    return {"created_at": created, "updated_at": created, "revision_number": obj.revision}


# --- lookups ---------------------------------------------------------------------------------------

async def network_by_id(o: Objects, net_id: str) -> Network:
    for n in await o.list(Network):
        if n.id == net_id:
            return n
    raise NeutronError(404, "NetworkNotFound", f"Network {net_id} could not be found.")


async def subnet_by_id(o: Objects, subnet_id: str) -> tuple[Network, Subnet]:
    for n in await o.list(Network):
        for s in n.subnets:
            if s.id == subnet_id:
                return n, s
    raise NeutronError(404, "SubnetNotFound", f"Subnet {subnet_id} could not be found.")


async def by_id(o: Objects, cls: type[T], ident: str, error: str, message: str) -> T:
    """The object of kind `cls` with id `ident`, or Neutron's 404 `error`: an id never holds "/",
    so a path in its place finds nothing rather than another object's store key."""
    obj = await o.get(cls, ident) if "/" not in ident else None
    if obj is None:
        raise NeutronError(404, error, message)
    return obj


async def port_by_id(o: Objects, port_id: str) -> Endpoint:
    return await by_id(o, Endpoint, port_id, "PortNotFound", f"Port {port_id} could not be found.")


async def sg_by_id(o: Objects, sg_id: str) -> SecurityGroup:
    return await by_id(o, SecurityGroup, sg_id, "SecurityGroupNotFound", f"Security group {sg_id} does not exist")


# --- version document and extensions ---------------------------------------------------------------

def version_document(base_url: str) -> dict[str, Any]:
    return {"versions": [{"id": "v2.0", "status": "CURRENT",
                          "links": [{"href": base_url.rstrip("/") + "/v2.0/", "rel": "self"}]}]}


EXTENSIONS = [
    ("security-group", "security-group", "The security groups extension."),
    ("binding", "Port Binding", "Expose port bindings of a virtual port to external application"),
    ("allowed-address-pairs", "Allowed Address Pairs", "Provides allowed address pairs"),
    ("port-security", "Port Security", "Provides port security"),
    ("external-net", "Neutron external network", "Adds external network attribute to network resource."),
    ("project-id", "project_id field enabled", "Extension that indicates that project_id field is enabled."),
    ("standard-attr-description", "standard-attr-description", "Extension to add descriptions to standard "
                                                                 "attributes"),
    ("standard-attr-revisions", "Resource revision numbers", "This extension will display the revision number of "
                                                              "neutron resources."),
    ("standard-attr-timestamp", "Resource timestamps", "Adds created_at and updated_at fields to all Neutron "
                                                        "resources that have Neutron standard attributes."),
    ("net-mtu", "Network MTU", "Provides MTU attribute for a network resource."),
    ("standard-attr-tag", "Tag support for resources with standard attribute: subnet, network, port, "
                          "security_group", "Enables to set tag on resources with standard attribute."),
    ("dns-integration", "DNS Integration", "Provides integration with DNS (dns_name of a port)."),
    ("router", "Neutron L3 Router", "Router abstraction for basic L3 forwarding between L2 Neutron networks and "
                                    "access to external networks via a NAT gateway."),
    ("ext-gw-mode", "Neutron L3 Configurable external gateway mode", "Extension of the router abstraction for "
                                                                     "specifying whether SNAT should occur on the "
                                                                     "external gateway"),
    ("dvr", "Distributed Virtual Router", "Enables configuration of Distributed Virtual Routers."),
]


def extension(alias: str, name: str, description: str) -> dict[str, Any]:
    return {"alias": alias, "name": name, "description": description, "updated": "2024-01-01T00:00:00-00:00",
            "links": []}


COLLECTIONS = ("networks", "subnets", "ports", "security-groups", "security-group-rules", "routers", "floatingips")


@router.get("/")
@router.get("", include_in_schema=False)
async def resources(request: Request) -> dict:
    base = str(request.base_url).rstrip("/") + "/v2.0/"
    return {"resources": [{"name": n[:-1], "collection": n, "links": [{"href": base + n, "rel": "self"}]}
                          for n in COLLECTIONS]}


@router.get("/extensions")
async def list_extensions() -> dict:
    return {"extensions": [extension(*e) for e in EXTENSIONS]}


@router.get("/extensions/{alias}")
async def get_extension(alias: str) -> dict:
    for e in EXTENSIONS:
        if e[0] == alias:
            return {"extension": extension(*e)}
    raise NeutronError(404, "HTTPNotFound", f"Extension with alias {alias} does not exist")


# --- networks --------------------------------------------------------------------------------------

NETWORK_NOT_IMPLEMENTED = {"shared", "provider:network_type", "provider:physical_network",
                           "availability_zone_hints", "is_default"}
NETWORK_ATTRS = {"name", "admin_state_up", "shared", "router:external", "mtu", "description", "tenant_id",
                 "project_id", "port_security_enabled", "provider:network_type", "provider:physical_network",
                 "provider:segmentation_id", "availability_zone_hints", "dns_domain", "is_default", "tags"}


def network_view(net: Network) -> dict[str, Any]:
    return {
        "id": net.id, "name": net.display_name or net.name, "tenant_id": net.project or "",
        "project_id": net.project or "",
        "subnets": [s.id for s in net.subnets], "status": "ACTIVE", "admin_state_up": True, "shared": False,
        "router:external": net.external, "mtu": net.mtu or DEFAULT_MTU, "port_security_enabled": True,
        "description": net.description, "tags": list(net.tags), "availability_zones": [],
        "availability_zone_hints": [], "ipv4_address_scope": None, "ipv6_address_scope": None, "is_default": False,
        "provider:network_type": "local" if net.encap == "direct" else "vxlan", "provider:physical_network": None,
        "provider:segmentation_id": net.vni, "l2_adjacency": False, "dns_domain": net.dns_domain + ".",
        **stamps(net),
    }


def check_network_body(body: dict[str, Any]) -> None:
    """Refuse what a network cannot be, before anything is stored."""
    check_implemented(body, NETWORK_NOT_IMPLEMENTED)
    for attr, why in (("admin_state_up", "a network cannot be disabled in Tether (disable its ports)"),
                      ("port_security_enabled", "port security is chosen per port in Tether; set "
                                                "port_security_enabled on the ports")):
        if bool_of(body, attr) is False:
            raise bad_request(f"Invalid input for {attr}. Reason: False is not supported: {why}. Leave {attr} out.")
    if "tags" in body:
        tags_of(body["tags"])
    text_of(body, "description")
    if "name" in body:
        text_of(body, "name")
    check_segment(body)


def check_segment(body: dict[str, Any]) -> None:
    """One VTEP per host carries every network with one VNI: a different segment cannot be honoured."""
    seg = body.get("provider:segmentation_id")
    if seg is not None and seg != VNI:
        raise bad_request(f"Invalid input for provider:segmentation_id. Reason: {str(seg)[:40]!r} cannot be honoured: "
                          f"Tether carries every network over one VXLAN segment ({VNI}); leave it out.")


@router.get("/networks")
async def list_networks(request: Request) -> dict:
    return {"networks": filtered(request, [network_view(n) for n in await objs(request).list(Network)])}


@router.get("/networks/{net_id}")
async def get_network(net_id: str, request: Request) -> dict:
    return {"network": network_view(await network_by_id(objs(request), net_id))}


@router.post("/networks", status_code=201)
async def create_network(request: Request) -> dict:
    body = await body_of(request, "network")
    check_attrs(body, NETWORK_ATTRS)
    check_network_body(body)
    net_id = new_id()
    name, display = names_of(body.get("name"), f"net-{net_id[:8]}", "network")
    net = Network(id=net_id, name=name, display_name=display, project=project_of(body),
                  external=bool(bool_of(body, "router:external")), mtu=body.get("mtu"),
                  description=text_of(body, "description"), tags=tags_of(body.get("tags") or []))
    if body.get("dns_domain"):
        net.dns_domain = str(body["dns_domain"]).rstrip(".")
        net = Network.model_validate(net.model_dump())
    o = objs(request)
    obj, _ = await o.put_network(net, create_only=True)
    await o.ensure_default_group(obj.project)  # Neutron: a project's first network makes its default group
    return {"network": network_view(obj)}


@router.put("/networks/{net_id}")
async def update_network(net_id: str, request: Request) -> dict:
    body = await body_of(request, "network")
    check_attrs(body, NETWORK_ATTRS)
    check_network_body(body)
    o = objs(request)
    net = await network_by_id(o, net_id)
    data = net.model_dump()
    if "name" in body:  # the key stays; the name shown changes (free text)
        new = text_of(body, "name")
        data["display_name"] = None if new == net.name else new
    data.update(described_fields(body))
    if body.get("dns_domain"):
        data["dns_domain"] = str(body["dns_domain"]).rstrip(".")
    if "router:external" in body:
        data["external"] = bool(bool_of(body, "router:external"))
    if "mtu" in body:
        data["mtu"] = body["mtu"]
    obj, _ = await o.put_network(Network.model_validate(data), create_only=False)
    return {"network": network_view(obj)}


@router.delete("/networks/{net_id}", status_code=204)
async def delete_network(net_id: str, request: Request) -> Response:
    o = objs(request)
    net = await network_by_id(o, net_id)
    try:
        await o.delete_network(net.name)
    except ApiError as e:
        if e.status == 409:
            raise NeutronError(409, "NetworkInUse", f"Unable to complete operation on network {net_id}. There are "
                                                    f"one or more ports still in use on the network.") from None
        raise
    return Response(status_code=204)


# --- subnets ---------------------------------------------------------------------------------------

SUBNET_NOT_IMPLEMENTED = {"subnetpool_id", "prefixlen", "use_default_subnetpool", "segment_id", "service_types",
                          "dns_publish_fixed_ip"}
SUBNET_ATTRS = {"name", "network_id", "cidr", "ip_version", "gateway_ip", "allocation_pools", "enable_dhcp",
                "dns_nameservers", "host_routes", "description", "tenant_id", "project_id", "ipv6_ra_mode",
                "ipv6_address_mode", "subnetpool_id", "prefixlen", "use_default_subnetpool", "segment_id",
                "service_types", "tags", "dns_publish_fixed_ip"}


def pools_view(s: Subnet) -> list[dict[str, str]]:
    if s.pools:
        out = []
        for p in s.pools:
            start, _, end = p.partition("-")
            out.append({"start": start.strip(), "end": (end or start).strip()})
        return out
    net = ipaddress.ip_network(s.cidr)
    hosts = [h for h in (net.hosts() if net.num_addresses <= 65536 else ()) if str(h) != s.gateway]
    if net.num_addresses > 65536:
        first, last = net.network_address + 1, net.broadcast_address - 1
        gw = ipaddress.ip_address(s.gateway) if s.gateway else None
        if gw == first:
            first += 1
        return [{"start": str(first), "end": str(last)}]
    # one range per run of consecutive addresses (the gateway splits the range in two)
    out, run = [], []
    for h in hosts:
        if run and int(h) != int(run[-1]) + 1:
            out.append({"start": str(run[0]), "end": str(run[-1])})
            run = []
        run.append(h)
    if run:
        out.append({"start": str(run[0]), "end": str(run[-1])})
    return out


def subnet_view(net: Network, s: Subnet) -> dict[str, Any]:
    return {
        "id": s.id, "name": s.name or "", "network_id": net.id, "tenant_id": net.project or "",
        "project_id": net.project or "", "cidr": s.cidr, "ip_version": ipaddress.ip_network(s.cidr).version,
        "gateway_ip": s.gateway, "allocation_pools": pools_view(s), "enable_dhcp": s.enable_dhcp,
        "dns_nameservers": list(s.dns_nameservers),
        "host_routes": [{"destination": r.destination, "nexthop": r.nexthop} for r in s.host_routes],
        "ipv6_ra_mode": None, "ipv6_address_mode": s.ipv6_address_mode, "subnetpool_id": None,
        "description": s.description, "tags": list(s.tags), "service_types": [], "segment_id": None, **stamps(net),
    }


def described_fields(body: dict[str, Any]) -> dict[str, Any]:
    """`description` and `tags`, when the request sets them (every resource that has them)."""
    out: dict[str, Any] = {}
    if "description" in body:
        out["description"] = text_of(body, "description")
    if "tags" in body:
        out["tags"] = tags_of(body["tags"] or [])
    return out


def pools_of(body: dict) -> list[dict]:
    """The request's allocation pools, each `{"start": address, "end": address}` (the model checks
    the addresses): anything else is Neutron's 400, not a server error."""
    pools = body.get("allocation_pools") or []
    if not isinstance(pools, list) or not all(
            isinstance(p, dict) and isinstance(p.get("start"), str) and isinstance(p.get("end"), str) for p in pools):
        raise bad_request(f"Invalid input for allocation_pools: {pools!r} is not a list of "
                          '{"start": address, "end": address}.')
    return pools


def subnet_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The DHCP and descriptive fields a subnet request sets (validated by the model when stored)."""
    out = described_fields(body)
    if "enable_dhcp" in body:
        out["enable_dhcp"] = bool_of(body, "enable_dhcp") is not False
    if "dns_nameservers" in body:
        servers = body["dns_nameservers"] or []
        if not isinstance(servers, list) or not all(isinstance(x, str) for x in servers):
            raise bad_request("Invalid input for dns_nameservers. Reason: a list of IP addresses is expected.")
        out["dns_nameservers"] = servers
    if "host_routes" in body:
        routes = body["host_routes"] or []
        if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
            raise bad_request("Invalid input for host_routes. Reason: a list of {destination, nexthop} is expected.")
        out["host_routes"] = [{"destination": str(r.get("destination")), "nexthop": str(r.get("nexthop"))}
                              for r in routes]
    return out


def parse_cidr(text: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise bad_request(f"Invalid input for cidr. Reason: '{text}' is not a valid IP subnet.") from None
    if "/" not in str(text) or str(net) != str(text):
        raise bad_request(f"Invalid input for cidr. Reason: '{text}' isn't a recommended IP address; did you mean "
                          f"'{net}'?")
    return net


def child_reads(member: str, parent: type[Network] | type[SecurityGroup], children: str,
                find: Callable[[Objects, str], Coroutine[Any, Any, tuple[Any, Any]]],
                view: Callable[[Any, Any], dict]) -> None:
    """GET /COLLECTION and GET /COLLECTION/{MEMBER_id} of a resource Tether keeps inside another
    (subnets in networks, rules in security groups), in Neutron's view; the list filtered by the query."""
    collection = member + "s"
    path = "/" + collection.replace("_", "-")

    async def list_all(request: Request) -> dict:
        items = [view(p, c) for p in await objs(request).list(parent) for c in getattr(p, children)]
        return {collection: filtered(request, items)}

    async def get_one(request: Request, item_id: str = Path(alias=f"{member.removeprefix('security_group_')}_id")
                      ) -> dict:
        return {member: view(*await find(objs(request), item_id))}

    router.add_api_route(path, list_all, methods=["GET"], name=f"list_{collection}")
    router.add_api_route(f"{path}/{{{member.removeprefix('security_group_')}_id}}", get_one, methods=["GET"],
                         name=f"get_{member}")


child_reads("subnet", Network, "subnets", subnet_by_id, subnet_view)


@router.post("/subnets", status_code=201)
async def create_subnet(request: Request) -> dict:
    body = await body_of(request, "subnet")
    check_attrs(body, SUBNET_ATTRS)
    check_implemented(body, SUBNET_NOT_IMPLEMENTED)
    if not body.get("network_id"):
        raise bad_request("Invalid input for network_id. Reason: a subnet needs a network_id.")
    if not body.get("cidr"):
        raise bad_request("Invalid input for cidr. Reason: a cidr is required (subnet pools are not supported).")
    cidr = parse_cidr(body["cidr"])
    if "ip_version" in body:
        version = body["ip_version"]
        if version not in (4, 6, "4", "6"):
            raise bad_request(f"Invalid input for ip_version. Reason: {str(version)[:20]!r} is not 4 or 6.")
        if int(version) != cidr.version:
            raise bad_request(f"Invalid input for operation: cidr {cidr} is not an IPv{version} subnet.")
    mode, ra = body.get("ipv6_address_mode"), body.get("ipv6_ra_mode")
    if (mode or ra) and cidr.version != 6:
        raise bad_request(f"Invalid input for operation: ipv6_address_mode and ipv6_ra_mode are for IPv6 subnets; "
                          f"{cidr} is IPv4.")
    if mode not in (None, "dhcpv6-stateful"):
        raise bad_request(f"Invalid input for ipv6_address_mode: {mode!r} is not supported. Tether assigns every IPv6 "
                          "address itself (dhcpv6-stateful) and sends no router advertisements, so SLAAC cannot "
                          "work; use dhcpv6-stateful or leave it out.")
    if ra is not None:
        raise bad_request(f"Invalid input for ipv6_ra_mode: {ra!r} is not supported. Tether sends no router "
                          "advertisements; leave ipv6_ra_mode out.")
    first = str(next(iter(cidr.hosts()), cidr.network_address))
    gateway = body.get("gateway_ip", first)  # Neutron's default: the first address
    pools = [f"{p['start']}-{p['end']}" for p in pools_of(body)]
    subnet = Subnet(cidr=str(cidr), gateway=gateway, pools=pools, name=text_of(body, "name") or None,
                    ipv6_address_mode=mode, **subnet_fields(body))
    o = objs(request)
    net_id = body["network_id"]

    check_project(body, await network_by_id(o, net_id), "subnet")

    async def attempt() -> Network:
        net = await network_by_id(o, net_id)
        data = net.model_dump()
        data["subnets"] = [*data["subnets"], subnet.model_dump()]
        obj, _ = await o.put_network(Network.model_validate(data), create_only=False)
        return obj

    net = await with_retries(attempt)
    return {"subnet": subnet_view(net, subnet)}


@router.put("/subnets/{subnet_id}")
async def update_subnet(subnet_id: str, request: Request) -> dict:
    body = await body_of(request, "subnet")
    check_attrs(body, SUBNET_ATTRS)
    o = objs(request)
    net, s = await subnet_by_id(o, subnet_id)
    changeable = {"name", "description", "enable_dhcp", "dns_nameservers", "host_routes", "tags"}
    if set(body) - changeable:
        raise bad_request(f"Cannot update read-only attribute(s) {', '.join(sorted(set(body) - changeable))}")
    data = s.model_dump()
    if "name" in body:
        data["name"] = text_of(body, "name") or None
    data.update(subnet_fields(body))
    new = Subnet.model_validate(data)
    net.subnets = [new if x.id == subnet_id else x for x in net.subnets]
    obj, _ = await o.put_network(net, create_only=False)
    return {"subnet": subnet_view(obj, new)}


@router.delete("/subnets/{subnet_id}", status_code=204)
async def delete_subnet(subnet_id: str, request: Request) -> Response:
    o = objs(request)
    net, s = await subnet_by_id(o, subnet_id)
    from tether.server import neutron_l3

    r = await neutron_l3.subnet_router(o, subnet_id)
    if r is not None:
        raise NeutronError(409, "SubnetInUse", f"Unable to complete operation on subnet {subnet_id}: router {r.id} "
                                               "has an interface on it (`openstack router remove subnet`).")
    cidr = ipaddress.ip_network(s.cidr)
    users = [e for e in await o.endpoints_in(net.name) if any(ipaddress.ip_address(ip) in cidr for ip in e.ips)]
    if users:
        raise NeutronError(409, "SubnetInUse", f"Unable to complete operation on subnet {subnet_id}: One or more "
                                               f"ports have an IP allocation from this subnet.")
    net.subnets = [x for x in net.subnets if x.id != subnet_id]
    await o.put_network(net, create_only=False)
    return Response(status_code=204)


# --- ports -----------------------------------------------------------------------------------------

PORT_NOT_IMPLEMENTED = {"binding:vnic_type", "qos_policy_id", "propagate_uplink_status", "numa_affinity_policy",
                        "extra_dhcp_opts"}
PORT_ATTRS = {"name", "network_id", "fixed_ips", "mac_address", "allowed_address_pairs", "security_groups",
              "device_id", "device_owner", "binding:host_id", "binding:profile", "binding:vnic_type",
              "admin_state_up", "description", "tenant_id", "project_id", "port_security_enabled", "tags",
              "extra_dhcp_opts", "dns_name", "qos_policy_id", "propagate_uplink_status", "numa_affinity_policy"}
UNNAMED = "tether.io/neutron-unnamed"
STATUS = {"pending": "BUILD", "active": "ACTIVE", "down": "DOWN"}


def port_view(ep: Endpoint, nets: dict[str, Network]) -> dict[str, Any]:
    net = nets.get(ep.network)
    fixed = []
    for ip in ep.ips:
        addr = ipaddress.ip_address(ip)
        sub = next((s for s in (net.subnets if net else []) if addr in ipaddress.ip_network(s.cidr)), None)
        fixed.append({"subnet_id": sub.id if sub else None, "ip_address": ip})
    mac = ep.mac or derived_mac(ep.id)
    owner = ep.owner
    device_owner = owner.device_owner or ("" if owner.type in ("api", "vm") else f"tether:{owner.type}")
    profile = {"netns": owner.netns} if owner.type == "vm" and owner.netns else {}
    return {
        "id": ep.id, "name": "" if ep.labels.get(UNNAMED) else ep.display_name or ep.name,
        "network_id": net.id if net else ep.network,
        "tenant_id": net.project or "" if net else "", "project_id": net.project or "" if net else "",
        "mac_address": mac, "fixed_ips": fixed,
        "allowed_address_pairs": [{"ip_address": p.ip_address, "mac_address": p.mac_address or mac}
                                  for p in ep.allowed_address_pairs],
        "security_groups": list(ep.security_groups), "device_id": owner.device_id or owner.container_id or "",
        "device_owner": device_owner, "binding:host_id": ep.host or "", "binding:profile": profile,
        "binding:vif_type": "tap" if ep.host else "unbound", "binding:vif_details": {"port_filter": True},
        "binding:vnic_type": "normal",
        "status": STATUS.get(ep.status, "DOWN") if ep.admin_state_up else "DOWN", "admin_state_up": ep.admin_state_up,
        "port_security_enabled": ep.port_security, "description": ep.description, "tags": list(ep.tags),
        "extra_dhcp_opts": [], "dns_name": ep.dns_name or "",
        "qos_policy_id": None, **stamps(ep),
    }


derived_mac = neutron_mac  # a stable MAC for endpoints created without one (e.g. by CNI: the kernel picked it)


async def nets_by_name(o: Objects) -> dict[str, Network]:
    return {n.name: n for n in await o.list(Network)}


def address_pairs(body: dict[str, Any]) -> list[AddressPair]:
    pairs = body.get("allowed_address_pairs") or []
    if not isinstance(pairs, list):
        raise bad_request("Invalid input for allowed_address_pairs. Reason: expected a list.")
    out = []
    for p in pairs:
        if not isinstance(p, dict) or "ip_address" not in p:
            raise bad_request("Invalid input for allowed_address_pairs. Reason: each pair needs an ip_address.")
        try:
            ipaddress.ip_network(p["ip_address"], strict=False)
        except ValueError:
            raise bad_request(f"Invalid input for allowed_address_pairs. Reason: '{p['ip_address']}' is not a valid "
                              "IP address or CIDR.") from None
        out.append(AddressPair(ip_address=p["ip_address"], mac_address=(p.get("mac_address") or None)))
    return out


async def check_groups(o: Objects, groups: Any, project: str | None) -> list[str]:
    """The ids of existing groups; the project's default group may not exist yet (the port's own
    write creates it: Objects.create_endpoint)."""
    if not isinstance(groups, list):
        raise bad_request("Invalid input for security_groups. Reason: expected a list of ids.")
    for g in groups:
        if str(g) != default_group_id(project):
            await sg_by_id(o, str(g))
    return [str(g) for g in groups]


def port_security_of(body: dict[str, Any]) -> bool | None:
    """`port_security_enabled` as a boolean, None when absent (Neutron also takes "true"/"false")."""
    value = body.get("port_security_enabled")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_request(f"Invalid input for port_security_enabled. Reason: '{str(value)[:40]}' is not a valid "
                      "boolean value.")


def trusted(device_owner: Any) -> bool:
    """Neutron's own ports (DHCP, router interfaces: device_owner `network:...`) get no default group."""
    return isinstance(device_owner, str) and device_owner.startswith("network:")


def groups_need_port_security() -> NeutronError:
    return NeutronError(400, "PortSecurityAndIPRequiredForSecurityGroups",
                        "Port security must be enabled and port must have an IP address in order to use security "
                        "groups.")


async def new_port_groups(o: Objects, body: dict[str, Any], net: Network) -> tuple[bool, list[str]]:
    """A new port's port security and groups, as Neutron decides them: without `security_groups`
    (absent or null), the project's default group, unless port security is off or the port is
    Neutron's own; an explicit empty list means no group (and, with port security, no traffic)."""
    secure = port_security_of(body)
    given = body.get("security_groups")
    if secure is False:
        if given:
            raise groups_need_port_security()
        return False, []
    if given is None:
        if trusted(body.get("device_owner")):
            return False, []
        return True, [default_group_id(net.project)]
    return True, await check_groups(o, given, net.project)


async def port_group_changes(o: Objects, body: dict[str, Any], ep: Endpoint) -> dict[str, Any]:
    """What a port update does to its groups and port security: port security cannot be turned off
    while the port keeps groups (Neutron's 400 when both are in the request, 409 otherwise)."""
    secure = port_security_of(body)
    changes: dict[str, Any] = {}
    if "security_groups" in body:
        net = (await nets_by_name(o)).get(ep.network)
        changes["security_groups"] = await check_groups(o, body["security_groups"] or [], net.project if net else None)
    if secure is None:  # groups given to a port without port security turn it on (Endpoint.port_security)
        return changes
    groups = changes.get("security_groups", ep.security_groups)
    if not secure and groups:
        if "security_groups" in body:
            raise groups_need_port_security()
        raise NeutronError(409, "PortSecurityPortHasSecurityGroup",
                           "Port has security group associated. Cannot disable port security or ip address until "
                           "security group is removed")
    changes["port_security"] = secure
    return changes


def vm_owner(body: dict[str, Any], old: Owner | None = None) -> Owner:
    """The port's owner: a VM port when it is bound to a host or owned by a compute instance."""
    owner = (old or Owner()).model_copy()
    if "device_id" in body:
        owner.device_id = body["device_id"] or None
    if "device_owner" in body:
        owner.device_owner = body["device_owner"] or None
    if "binding:profile" in body:
        profile = body["binding:profile"] or {}
        if not isinstance(profile, dict):
            raise bad_request("Invalid input for binding:profile. Reason: expected a dictionary.")
        netns = profile.get("netns") or None
        problem = netns_problem(netns) if isinstance(netns, str) else None if netns is None else "is not a string"
        if problem:
            raise bad_request(f"Invalid input for binding:profile. Reason: netns {str(netns)[:80]!r} {problem}.")
        owner.netns = netns
    host = body.get("binding:host_id")
    if owner.type in ("api", "vm"):
        is_vm = bool(host) or (owner.device_owner or "").startswith("compute:") or bool(owner.netns)
        owner.type = "vm" if is_vm else "api"
    return Owner.model_validate(owner.model_dump())  # model_copy and assignment skip the validators


@router.get("/ports")
async def list_ports(request: Request) -> dict:
    o = objs(request)
    nets = await nets_by_name(o)
    from tether.server import neutron_l3  # the router interfaces added by subnet are ports too

    views = [port_view(e, nets) for e in await o.observed(await o.list(Endpoint))]
    return {"ports": filtered(request, views + await neutron_l3.interface_ports(o, nets))}


@router.get("/ports/{port_id}")
async def get_port(port_id: str, request: Request) -> dict:
    o = objs(request)
    try:
        ep = await port_by_id(o, port_id)
    except NeutronError:
        from tether.server import neutron_l3

        shown = await neutron_l3.interface_port(o, port_id)
        if shown is None:
            raise
        return {"port": shown}
    return {"port": port_view((await o.observed([ep]))[0], await nets_by_name(o))}


def port_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The descriptive and state fields a port request sets."""
    check_implemented(body, PORT_NOT_IMPLEMENTED)
    out = described_fields(body)
    if "admin_state_up" in body:
        out["admin_state_up"] = bool_of(body, "admin_state_up") is not False
    if "dns_name" in body:
        name = text_of(body, "dns_name").rstrip(".")
        if name and not DNS_LABEL.match(name):
            raise bad_request(f"Invalid input for dns_name. Reason: {name[:64]!r} is not a DNS label here (1-63 "
                              "lower-case letters, digits and '-'; Tether adds the network's dns_domain).")
        out["dns_name"] = name or None
    return out


async def requested_ips(o: Objects, body: dict[str, Any], net: Network) -> list[str]:
    """The addresses a port asks for. An entry with a `subnet_id` and no `ip_address` is allowed
    only where it means what Tether does anyway (one address per family, from the only subnet of
    that family); otherwise it would be dropped, so it is refused."""
    ips: list[str] = []
    subnet_only = []
    entries = fixed_ip_entries(body)
    for f in entries:
        sub = None
        if f.get("subnet_id"):
            n, sub = await subnet_by_id(o, f["subnet_id"])
            if n.id != net.id:
                raise bad_request(f"Invalid input for operation: Failed to create port on network {net.id}, "
                                  f"because fixed_ips included invalid subnet {sub.id}.")
        if f.get("ip_address"):
            ip = str(f["ip_address"])
            if sub is not None and not in_cidr(ip, sub.cidr):
                raise bad_request(f"Invalid input for operation: IP address {ip[:60]} is not a valid IP for the "
                                  f"specified subnet {sub.id}.")
            ips.append(ip)
        elif sub is not None:
            subnet_only.append(sub)
        else:
            raise bad_request("Invalid input for fixed_ips. Reason: each entry needs a subnet_id or an ip_address.")
    for sub in subnet_only:
        version = ipaddress.ip_network(sub.cidr).version
        same = [x for x in net.subnets if ipaddress.ip_network(x.cidr).version == version]
        if ips or len(subnet_only) > 1 or len(same) > 1:
            raise bad_request(f"Invalid input for fixed_ips. Reason: subnet {sub.id} without an ip_address cannot be "
                              "honoured here (Tether picks one address per IP family of the network); give the "
                              "ip_address of each fixed IP.")
    return ips


async def check_free(o: Objects, net: Network, ips: list[str]) -> None:
    """Each address is inside one of the network's subnets, not its gateway and held by no port."""
    held = {ip: e for e in await o.endpoints_in(net.name) for ip in e.ips}
    for ip in ips:
        sub = next((x for x in net.subnets if in_cidr(ip, x.cidr)), None)
        if sub is None:
            raise bad_request(f"Invalid input for fixed_ips. Reason: {ip[:60]} is in no subnet of network {net.id}.")
        if ip == sub.gateway:
            raise bad_request(f"Invalid input for fixed_ips. Reason: {ip} is the gateway of subnet {sub.id}.")
        if ip in held:
            raise NeutronError(409, "IpAddressAlreadyAllocated", f"IP address {ip} already allocated in subnet "
                                                                 f"{sub.id}.")


def in_cidr(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    except ValueError:
        return False


def fixed_ip_entries(body: dict) -> list[dict]:
    """A port body's `fixed_ips`: a list of dictionaries, as Neutron requires (400 otherwise)."""
    entries = body.get("fixed_ips") or []
    if not isinstance(entries, list) or not all(isinstance(f, dict) for f in entries):
        raise bad_request("Invalid input for fixed_ips. Reason: a list of dictionaries is expected.")
    return entries


@router.post("/ports", status_code=201)
async def create_port(request: Request) -> dict:
    body = await body_of(request, "port")
    check_attrs(body, PORT_ATTRS)
    if not body.get("network_id"):
        raise bad_request("Invalid input for network_id. Reason: a port needs a network_id.")
    o = objs(request)
    net = await network_by_id(o, body["network_id"])
    check_project(body, net, "port")
    port_id = new_id()
    fields = port_fields(body)
    ips = await requested_ips(o, body, net)
    owner = vm_owner(body)
    name, display = names_of(body.get("name"), f"port-{port_id[:8]}", "port")
    labels = {} if body.get("name") else {UNNAMED: "true"}
    secure, groups = await new_port_groups(o, body, net)
    ep = Endpoint(id=port_id, name=name, display_name=display, network=net.name, **fields,
                  anti_spoofing=port_security_of(body) is not False,
                  host=body.get("binding:host_id") or None, ips=ips,
                  mac=(body.get("mac_address") or random_neutron_mac()),
                  owner=owner, labels=labels, interface=vif_name(port_id) if owner.type == "vm" else None,
                  security_groups=groups, port_security=secure, allowed_address_pairs=address_pairs(body))
    try:
        obj, _ = await o.create_endpoint(ep, require_subnet=False)  # Neutron allows a port without fixed IPs
    except ApiError as e:
        if e.status == 409 and "already in use" in e.detail:
            ip = next((i for i in ips if i in e.detail), ips[0] if ips else "")
            raise NeutronError(409, "IpAddressAlreadyAllocated",
                               f"IP address {ip} already allocated in subnet "
                               f"{subnet_of_ip(net, ip)}.") from None
        raise
    return {"port": port_view(obj, {net.name: net})}


def subnet_of_ip(net: Network, ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    return next((s.id for s in net.subnets if addr in ipaddress.ip_network(s.cidr)), "")


@router.put("/ports/{port_id}")
async def update_port(port_id: str, request: Request) -> dict:
    body = await body_of(request, "port")
    check_attrs(body, PORT_ATTRS)
    o = objs(request)
    ep = await port_by_id(o, port_id)
    changes: dict[str, Any] = port_fields(body)
    if "name" in body:  # the Tether name (its DNS label) stays; the name shown changes (free text)
        new = text_of(body, "name")
        changes["display_name"] = None if new == ep.name else new
        if new and ep.labels.get(UNNAMED):
            changes["labels"] = {k: v for k, v in ep.labels.items() if k != UNNAMED}
        elif not new:
            changes["labels"] = {**ep.labels, UNNAMED: "true"}
            changes["display_name"] = None
    new_ips: list[str] | None = None
    if "fixed_ips" in body:
        current = (await nets_by_name(o)).get(ep.network)
        if current is None:
            raise bad_request(f"Invalid input for fixed_ips. Reason: the port's network {ep.network} is gone.")
        entries = fixed_ip_entries(body)
        if any(not f.get("ip_address") for f in entries):
            raise bad_request("Invalid input for fixed_ips. Reason: an update needs the ip_address of each fixed IP "
                              "(Tether does not pick an address per subnet); list the addresses to keep and add.")
        new_ips = await requested_ips(o, body, current)
        if sorted(new_ips) == sorted(ep.ips):
            new_ips = None
        else:  # checked before anything is written, so a refused address leaves the port as it was
            await check_free(o, current, [ip for ip in new_ips if ip not in ep.ips])
    if "network_id" in body:
        current = (await nets_by_name(o)).get(ep.network)
        if current is None or body["network_id"] != current.id:
            raise bad_request("Cannot update read-only attribute network_id")
    changes.update(await port_group_changes(o, body, ep))
    if "port_security" in changes:  # Neutron: port security off also means no anti-spoofing
        changes["anti_spoofing"] = changes["port_security"]
    if "allowed_address_pairs" in body:
        changes["allowed_address_pairs"] = [p.model_dump() for p in address_pairs(body)]
    if "mac_address" in body and body["mac_address"] != ep.mac:
        changes["mac"] = body["mac_address"]
    if "binding:host_id" in body:
        changes["host"] = body["binding:host_id"] or None
    if {"device_id", "device_owner", "binding:profile", "binding:host_id"} & set(body):
        owner = vm_owner(body, ep.owner)
        changes["owner"] = owner.model_dump()
    obj = await o.update_endpoint(ep.id, changes) if changes else ep
    if new_ips is not None:  # last: every other change was accepted (a refused address changes nothing)
        try:
            obj = await o.change_endpoint_ips(ep.id, new_ips)
        except ApiError as e:
            if e.status == 409 and "already in use" in e.detail:
                raise NeutronError(409, "IpAddressAlreadyAllocated", e.detail) from None
            raise
    return {"port": port_view(obj, await nets_by_name(o))}


@router.delete("/ports/{port_id}", status_code=204)
async def delete_port(port_id: str, request: Request) -> Response:
    o = objs(request)
    from tether.server import neutron_l3

    if await neutron_l3.interface_port(o, port_id) is not None and await o.get(Endpoint, port_id) is None:
        raise NeutronError(409, "PortInUse", f"Port {port_id} cannot be deleted directly via the port API: it has "
                                             "device owner network:router_interface (`openstack router remove "
                                             "subnet`).")
    await neutron_l3.release_port(o, await port_by_id(o, port_id))
    if await o.delete_endpoint(port_id) is None:
        raise NeutronError(404, "PortNotFound", f"Port {port_id} could not be found.")
    return Response(status_code=204)


# --- security groups -------------------------------------------------------------------------------

SG_ATTRS = {"name", "description", "tenant_id", "project_id", "stateful", "tags"}
RULE_NOT_IMPLEMENTED = {"remote_address_group_id"}
RULE_ATTRS = {"security_group_id", "direction", "ethertype", "protocol", "port_range_min", "port_range_max",
              "remote_ip_prefix", "remote_group_id", "remote_address_group_id", "description", "tenant_id",
              "project_id", "normalized_cidr"}


def rule_view(sg: SecurityGroup, r: SecurityGroupRule) -> dict[str, Any]:
    return {
        "id": r.id, "security_group_id": sg.id, "direction": r.direction, "ethertype": r.ethertype,
        "protocol": r.protocol, "port_range_min": r.port_range_min, "port_range_max": r.port_range_max,
        "remote_ip_prefix": r.remote_ip_prefix, "normalized_cidr": r.remote_ip_prefix,
        "remote_group_id": r.remote_group_id, "remote_address_group_id": None, "description": r.description,
        "tenant_id": sg.project or "", "project_id": sg.project or "", **stamps(sg),
    }


def sg_view(sg: SecurityGroup) -> dict[str, Any]:
    return {"id": sg.id, "name": sg.name, "description": sg.description, "tenant_id": sg.project or "",
            "project_id": sg.project or "", "stateful": True, "shared": False, "tags": list(sg.tags),
            "security_group_rules": [rule_view(sg, r) for r in sg.rules], **stamps(sg)}


@router.get("/security-groups")
async def list_sgs(request: Request) -> dict:
    o = objs(request)
    q = request.query_params
    project = q.get("project_id") or q.get("tenant_id") or None
    try:  # Neutron: listing a project's groups makes its default group (the caller's project: none here)
        await o.ensure_default_group(project)
    except ValidationError:
        pass  # a filter no project can have: nothing to make, and the filter matches nothing
    return {"security_groups": filtered(request, [sg_view(s) for s in await o.list(SecurityGroup)])}


@router.get("/security-groups/{sg_id}")
async def get_sg(sg_id: str, request: Request) -> dict:
    return {"security_group": sg_view(await sg_by_id(objs(request), sg_id))}


@router.post("/security-groups", status_code=201)
async def create_sg(request: Request) -> dict:
    body = await body_of(request, "security_group")
    check_attrs(body, SG_ATTRS)
    check_implemented(body, {"stateful"})
    check_not_default_name(body)
    # Neutron gives every new group rules that allow all egress
    sg = SecurityGroup(name=text_of(body, "name"), description=text_of(body, "description"),
                       project=project_of(body), tags=tags_of(body.get("tags") or []),
                       rules=[SecurityGroupRule(direction="egress", ethertype=e) for e in ("IPv4", "IPv6")])
    o = objs(request)
    obj = await with_retries(lambda: o.create(sg))
    await o.ensure_default_group(obj.project)
    return {"security_group": sg_view(obj)}


def check_project(body: dict[str, Any], net: Network, what: str) -> None:
    """A subnet's or port's project is its network's: another one asked for is refused, not ignored."""
    asked = project_of(body)
    if asked and asked != (net.project or ""):
        raise bad_request(f"Invalid input for project_id. Reason: a {what}'s project is its network's "
                          f"({net.project or 'none'}) in Tether; {str(asked)[:40]!r} cannot be honoured. Leave it "
                          "out.")


def check_not_default_name(body: dict[str, Any]) -> None:
    """`default` is the name of each project's default group only (Neutron's 409)."""
    if isinstance(body.get("name"), str) and body["name"].lower() == DEFAULT_GROUP:
        raise NeutronError(409, "SecurityGroupDefaultAlreadyExists", "Default security group already exists.")


@router.put("/security-groups/{sg_id}")
async def update_sg(sg_id: str, request: Request) -> dict:
    body = await body_of(request, "security_group")
    check_attrs(body, SG_ATTRS)
    check_implemented(body, {"stateful"})
    o = objs(request)

    async def attempt() -> SecurityGroup:
        sg = await sg_by_id(o, sg_id)
        if "name" in body and is_default_group(sg):
            raise NeutronError(409, "SecurityGroupCannotUpdateDefault", "Updating default security group not allowed.")
        check_not_default_name(body)
        if "name" in body:
            sg.name = str(body["name"] or "")
        sg = sg.model_copy(update=described_fields(body))
        return await o.replace(sg, sg.revision)

    return {"security_group": sg_view(await with_retries(attempt))}


@router.delete("/security-groups/{sg_id}", status_code=204)
async def delete_sg(sg_id: str, request: Request) -> Response:
    o = objs(request)
    sg = await sg_by_id(o, sg_id)
    if is_default_group(sg):
        raise NeutronError(409, "SecurityGroupCannotRemoveDefault", "Insufficient rights for removing default "
                                                                    "security group.")
    if any(sg.id in e.security_groups for e in await o.list(Endpoint)):
        raise NeutronError(409, "SecurityGroupInUse", f"Security Group {sg.id} in use.")
    others = [s for s in await o.list(SecurityGroup) if s.id != sg.id]
    if any(r.remote_group_id == sg.id for s in others for r in s.rules):
        raise NeutronError(409, "SecurityGroupInUse", f"Security Group {sg.id} in use (a rule of another group "
                                                      "refers to it).")
    await o.remove(sg)
    return Response(status_code=204)


def normalise_protocol(value: Any) -> str | None:
    if value in (None, "", "any"):
        return None
    p = str(value).lower()
    p = PROTOCOLS.get(p, p)
    if p in ("tcp", "udp", "icmp", "icmpv6", "sctp"):
        return p
    if p.isdigit() and 0 <= int(p) <= 255:
        return p
    raise NeutronError(400, "SecurityGroupRuleInvalidProtocol",
                       f"Security group rule protocol {value} not supported. Only protocol values "
                       "[None, 'tcp', 'udp', 'icmp', 'icmpv6', 'sctp'] and integer representations [0 to 255] "
                       "are supported.")


def make_rule(body: dict[str, Any]) -> SecurityGroupRule:
    direction = body.get("direction")
    if direction not in ("ingress", "egress"):
        raise bad_request(f"Invalid input for direction. Reason: {direction!r} is not in ['ingress', 'egress'].")
    ethertype = body.get("ethertype") or "IPv4"
    if ethertype not in ("IPv4", "IPv6"):
        raise bad_request(f"Invalid input for ethertype. Reason: {ethertype!r} is not in ['IPv4', 'IPv6'].")
    protocol = normalise_protocol(body.get("protocol"))
    pmin, pmax = body.get("port_range_min"), body.get("port_range_max")
    if (pmin is not None or pmax is not None) and protocol not in ("tcp", "udp", "sctp", "icmp", "icmpv6"):
        raise NeutronError(400, "SecurityGroupProtocolRequiredWithPorts",
                           "Must also specify protocol if port range is given.")
    if protocol in ("tcp", "udp", "sctp"):
        if pmin is not None and pmax is None:
            pmax = pmin
        if pmin is not None and pmax is not None and int(pmin) > int(pmax):
            raise NeutronError(400, "SecurityGroupInvalidPortRange",
                               "For TCP/UDP protocols, port_range_min must be <= port_range_max")
    prefix = body.get("remote_ip_prefix")
    if prefix and body.get("remote_group_id"):
        raise NeutronError(400, "SecurityGroupRemoteGroupAndRemoteIpPrefix",
                           "Only remote_ip_prefix or remote_group_id may be provided.")
    if prefix:
        try:
            net = ipaddress.ip_network(str(prefix), strict=False)
        except ValueError:
            raise bad_request(f"Invalid input for remote_ip_prefix. Reason: '{prefix}' is not a valid IP "
                              "subnet.") from None
        if (net.version == 4) != (ethertype == "IPv4"):
            raise NeutronError(400, "SecurityGroupRuleParameterConflict",
                               f"Conflicting value ethertype {ethertype} for CIDR {prefix}")
        prefix = str(net)
    return SecurityGroupRule(direction=direction, ethertype=ethertype, protocol=protocol,
                             port_range_min=None if pmin is None else int(pmin),
                             port_range_max=None if pmax is None else int(pmax), remote_ip_prefix=prefix or None,
                             remote_group_id=body.get("remote_group_id") or None,
                             description=str(body.get("description") or ""))


def same_rule(a: SecurityGroupRule, b: SecurityGroupRule) -> bool:
    keys = ("direction", "ethertype", "protocol", "port_range_min", "port_range_max", "remote_ip_prefix",
            "remote_group_id")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


async def find_rule(o: Objects, rule_id: str) -> tuple[SecurityGroup, SecurityGroupRule]:
    for sg in await o.list(SecurityGroup):
        for r in sg.rules:
            if r.id == rule_id:
                return sg, r
    raise NeutronError(404, "SecurityGroupRuleNotFound", f"Security group rule {rule_id} does not exist")


child_reads("security_group_rule", SecurityGroup, "rules", find_rule, rule_view)


@router.post("/security-group-rules", status_code=201)
async def create_rule(request: Request) -> dict:
    body = await body_of(request, "security_group_rule")
    check_attrs(body, RULE_ATTRS)
    check_implemented(body, RULE_NOT_IMPLEMENTED)
    if "normalized_cidr" in body:
        raise bad_request("Attribute 'normalized_cidr' not allowed in POST: it is derived from remote_ip_prefix.")
    if not body.get("security_group_id"):
        raise bad_request("Invalid input for security_group_id. Reason: a rule needs a security_group_id.")
    rule = make_rule(body)
    o = objs(request)
    if rule.remote_group_id and rule.remote_group_id != body["security_group_id"]:
        await sg_by_id(o, rule.remote_group_id)

    async def attempt() -> SecurityGroup:
        sg = await sg_by_id(o, body["security_group_id"])
        dup = next((r for r in sg.rules if same_rule(r, rule)), None)
        if dup is not None:
            raise NeutronError(409, "SecurityGroupRuleExists", f"Security group rule already exists. Rule id is "
                                                               f"{dup.id}.")
        sg.rules.append(rule)
        return await o.replace(sg, sg.revision)

    sg = await with_retries(attempt)
    return {"security_group_rule": rule_view(sg, rule)}


@router.delete("/security-group-rules/{rule_id}", status_code=204)
async def delete_rule(rule_id: str, request: Request) -> Response:
    o = objs(request)

    async def attempt() -> None:
        sg, _ = await find_rule(o, rule_id)
        sg.rules = [r for r in sg.rules if r.id != rule_id]
        await o.replace(sg, sg.revision)

    await with_retries(attempt)
    return Response(status_code=204)


# --- tags (the standard-attr-tag extension: what `openstack ... create/set/unset --tag` calls) -------

TAGGED = ("networks", "subnets", "ports", "security-groups", "routers", "floatingips")


async def current_tags(o: Objects, resource: str, rid: str) -> list[str]:
    if resource == "networks":
        return list((await network_by_id(o, rid)).tags)
    if resource == "subnets":
        return list((await subnet_by_id(o, rid))[1].tags)
    if resource == "ports":
        return list((await port_by_id(o, rid)).tags)
    if resource in ("routers", "floatingips"):
        return list((await l3_object(o, resource, rid)).tags)
    return list((await sg_by_id(o, rid)).tags)


async def l3_object(o: Objects, resource: str, rid: str) -> Any:
    from tether.server import neutron_l3

    return await (neutron_l3.router_by_id(o, rid) if resource == "routers" else neutron_l3.fip_by_id(o, rid))


async def store_tags(o: Objects, resource: str, rid: str, edit: Callable[[list[str]], list[str]]) -> list[str]:
    """Replace a resource's tags with `edit(current)`, re-read on a conflicting write."""
    if resource == "ports":
        ep = await port_by_id(o, rid)
        return list((await o.update_endpoint(ep.id, {"tags": tags_of(edit(list(ep.tags)))})).tags)
    if resource in ("routers", "floatingips"):
        async def attempt_l3() -> Any:
            obj = await l3_object(o, resource, rid)
            obj.tags = tags_of(edit(list(obj.tags)))
            return await o.replace(type(obj).model_validate(obj.model_dump()), obj.revision)
        return list((await with_retries(attempt_l3)).tags)
    if resource == "security-groups":
        async def attempt() -> SecurityGroup:
            sg = await sg_by_id(o, rid)
            sg.tags = tags_of(edit(list(sg.tags)))
            return await o.replace(sg, sg.revision)
        return list((await with_retries(attempt)).tags)
    if resource == "networks":
        net = await network_by_id(o, rid)
        net.tags = tags_of(edit(list(net.tags)))
        await o.put_network(Network.model_validate(net.model_dump()), create_only=False)
        return net.tags
    net, sub = await subnet_by_id(o, rid)
    sub.tags = tags_of(edit(list(sub.tags)))
    await o.put_network(Network.model_validate(net.model_dump()), create_only=False)
    return sub.tags


def tagged(resource: str) -> None:
    if resource not in TAGGED:
        raise NeutronError(404, "HTTPNotFound", f"The resource could not be found: tags are served for "
                                                f"{', '.join(TAGGED)}, not {resource[:40]}.")


@router.get("/{resource}/{rid}/tags")
async def get_tags(resource: str, rid: str, request: Request) -> dict:
    tagged(resource)
    return {"tags": await current_tags(objs(request), resource, rid)}


@router.get("/{resource}/{rid}/tags/{tag}", status_code=204)
async def has_tag(resource: str, rid: str, tag: str, request: Request) -> Response:
    tagged(resource)
    if tag not in await current_tags(objs(request), resource, rid):
        raise NeutronError(404, "TagNotFound", f"Tag {tag} could not be found for {resource[:-1]} {rid}.")
    return Response(status_code=204)


@router.put("/{resource}/{rid}/tags")
async def replace_tags(resource: str, rid: str, request: Request) -> dict:
    tagged(resource)
    try:
        data = await request.json()
    except ValueError:
        raise bad_request("Malformed request body: the body is not valid JSON") from None
    if not isinstance(data, dict) or "tags" not in data:
        raise bad_request("Invalid input for tags. Reason: the body must be {\"tags\": [...]}.")
    new = tags_of(data["tags"])
    return {"tags": await store_tags(objs(request), resource, rid, lambda _: new)}


@router.put("/{resource}/{rid}/tags/{tag}", status_code=201)
async def add_tag(resource: str, rid: str, tag: str, request: Request) -> Response:
    tagged(resource)
    tags_of([tag])
    await store_tags(objs(request), resource, rid, lambda old: old if tag in old else [*old, tag])
    return Response(status_code=201)


@router.delete("/{resource}/{rid}/tags", status_code=204)
async def remove_all_tags(resource: str, rid: str, request: Request) -> Response:
    tagged(resource)
    await store_tags(objs(request), resource, rid, lambda _: [])
    return Response(status_code=204)


@router.delete("/{resource}/{rid}/tags/{tag}", status_code=204)
async def remove_tag(resource: str, rid: str, tag: str, request: Request) -> Response:
    tagged(resource)
    o = objs(request)
    if tag not in await current_tags(o, resource, rid):
        raise NeutronError(404, "TagNotFound", f"Tag {tag} could not be found for {resource[:-1]} {rid}.")
    await store_tags(o, resource, rid, lambda old: [t for t in old if t != tag])
    return Response(status_code=204)


@fallback.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def unknown(rest: str) -> Response:
    raise NeutronError(404, "HTTPNotFound", f"The resource could not be found: /v2.0/{rest} is not served here "
                                            f"({', '.join(COLLECTIONS)}, their tags, extensions).")
