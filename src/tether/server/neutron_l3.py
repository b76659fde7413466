"""Neutron's L3 API (`/v2.0/routers`, `/v2.0/floatingips`) over Tether's Router and FloatingIP objects.

What the datapath makes of them is calc/l3.py (distributed, on every host). As in the rest of
`/v2.0`, an attribute Tether does not implement is refused with a 400 naming it before anything is
stored, and a request that fails leaves nothing behind: a router interface is one write of the
router; a floating IP's address is taken in IPAM (an endpoint with device_owner
`network:floatingip`, as Neutron's own port) and released again when the floating IP's own write fails.

Deliberate differences: the router's SNAT address is the address of the host a packet leaves from
(distributed SNAT), so `external_gateway_info.external_fixed_ips` is empty and cannot be asked for;
routers route IPv4 only; extra routes, HA, flavors and availability zones are refused.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Request, Response

from tether.model import Endpoint, FloatingIP, Network, Owner, Router, RouterInterface, new_id
from tether.server.neutron import (
    NeutronError,
    NeutronRoute,
    bad_request,
    body_of,
    bool_of,
    by_id,
    check_attrs,
    described_fields,
    filtered,
    in_cidr,
    nets_by_name,
    network_by_id,
    objs,
    port_by_id,
    project_of,
    stamps,
    subnet_by_id,
    tags_of,
    text_of,
)
from tether.server.objects import ApiError, Objects, with_retries

router = APIRouter(prefix="/v2.0", route_class=NeutronRoute)

ROUTER_INTERFACE = "network:router_interface"
FLOATINGIP_OWNER = "network:floatingip"
OWNED_BY_L3 = (ROUTER_INTERFACE, FLOATINGIP_OWNER)


# --- lookups ---------------------------------------------------------------------------------------

async def router_by_id(o: Objects, router_id: str) -> Router:
    return await by_id(o, Router, router_id, "RouterNotFound", f"Router {router_id} could not be found")


async def fip_by_id(o: Objects, fip_id: str) -> FloatingIP:
    return await by_id(o, FloatingIP, fip_id, "FloatingIPNotFound", f"Floating IP {fip_id} could not be found")


async def external_network(o: Objects, net_id: Any) -> Network:
    if not isinstance(net_id, str) or not net_id:
        raise bad_request("Invalid input for network_id. Reason: the external network's id is required.")
    net = await network_by_id(o, net_id)
    if not net.external:
        raise bad_request(f"Invalid input for operation: network {net_id} is not an external network (create it "
                          "with `openstack network create --external`).")
    return net


# --- routers ---------------------------------------------------------------------------------------

ROUTER_ATTRS = {"name", "description", "admin_state_up", "tenant_id", "project_id", "external_gateway_info",
                "distributed", "ha", "availability_zone_hints", "flavor_id", "routes", "tags", "enable_ndp_proxy"}
GATEWAY_ATTRS = {"network_id", "enable_snat", "external_fixed_ips", "qos_policy_id"}
# attribute -> (values that mean "what Tether does", why anything else is refused)
ROUTER_NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "admin_state_up": ((True,), "a router cannot be disabled in Tether (it is every host's routing, not a device)"),
    "distributed": ((True,), "every Tether router is distributed: each host routes and NATs for its own ports"),
    "ha": ((False,), "there is no router instance to make highly available (routers are distributed)"),
    "availability_zone_hints": (([],), "availability zones are not implemented"),
    "flavor_id": ((), "router flavors are not implemented"),
    "routes": (([],), "extra routes on routers are not implemented; use subnet host_routes"),
    "enable_ndp_proxy": ((False,), "NDP proxy is not implemented (routers route IPv4 only)"),
}


def refuse_unimplemented(body: dict[str, Any], table: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    for attr in sorted(set(table) & set(body)):
        accepted, why = table[attr]
        value = body[attr]
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value is None or value in accepted:
            continue
        raise bad_request(f"Invalid input for {attr}. Reason: {str(value)[:60]!r} is not supported: {why}. "
                          f"Leave {attr} out.")


async def gateway_of(o: Objects, body: dict[str, Any]) -> tuple[str | None, bool] | None:
    """(external network name or None, enable_snat) from `external_gateway_info`; None when the
    request does not set it. `{}` or null clears the gateway."""
    if "external_gateway_info" not in body:
        return None
    info = body["external_gateway_info"]
    if not info:
        return None, True
    if not isinstance(info, dict):
        raise bad_request("Invalid input for external_gateway_info. Reason: a dictionary is expected.")
    check_attrs(info, GATEWAY_ATTRS)
    if info.get("external_fixed_ips"):
        raise bad_request("Invalid input for external_gateway_info. Reason: external_fixed_ips is not supported: "
                          "a Tether router source-NATs to the address of the host each packet leaves from "
                          "(distributed SNAT), so it holds no gateway address. Leave external_fixed_ips out.")
    if info.get("qos_policy_id"):
        raise bad_request("Invalid input for external_gateway_info. Reason: QoS policies are not implemented. "
                          "Leave qos_policy_id out.")
    net = await external_network(o, info.get("network_id"))
    snat = bool_of(info, "enable_snat")
    return net.name, True if snat is None else snat


def router_view(r: Router, nets: dict[str, Network]) -> dict[str, Any]:
    ext = nets.get(r.external_network or "")
    gateway = {"network_id": ext.id, "enable_snat": r.enable_snat, "external_fixed_ips": []} if ext else None
    return {
        "id": r.id, "name": r.name, "description": r.description, "tenant_id": r.project or "",
        "project_id": r.project or "", "status": "ACTIVE", "admin_state_up": True,
        "external_gateway_info": gateway, "routes": [], "distributed": True, "ha": False,
        "availability_zones": [], "availability_zone_hints": [], "flavor_id": None, "tags": list(r.tags),
        **stamps(r),
    }


@router.get("/routers")
async def list_routers(request: Request) -> dict:
    o = objs(request)
    nets = await nets_by_name(o)
    return {"routers": filtered(request, [router_view(r, nets) for r in await o.list(Router)])}


@router.get("/routers/{router_id}")
async def get_router(router_id: str, request: Request) -> dict:
    o = objs(request)
    return {"router": router_view(await router_by_id(o, router_id), await nets_by_name(o))}


@router.post("/routers", status_code=201)
async def create_router(request: Request) -> dict:
    body = await body_of(request, "router")
    check_attrs(body, ROUTER_ATTRS)
    refuse_unimplemented(body, ROUTER_NOT_IMPLEMENTED)
    o = objs(request)
    gateway = await gateway_of(o, body)
    r = Router(name=text_of(body, "name"), project=project_of(body), description=text_of(body, "description"),
               tags=tags_of(body.get("tags") or []))
    if gateway is not None:
        r.external_network, r.enable_snat = gateway
    obj = await with_retries(lambda: o.create(Router.model_validate(r.model_dump())))
    return {"router": router_view(obj, await nets_by_name(o))}


@router.put("/routers/{router_id}")
async def update_router(router_id: str, request: Request) -> dict:
    body = await body_of(request, "router")
    check_attrs(body, ROUTER_ATTRS)
    refuse_unimplemented(body, ROUTER_NOT_IMPLEMENTED)
    o = objs(request)
    gateway = await gateway_of(o, body)

    async def attempt() -> Router:
        r = await router_by_id(o, router_id)
        data = r.model_dump()
        if "name" in body:
            data["name"] = text_of(body, "name")
        data.update(described_fields(body))
        if gateway is not None:
            if gateway[0] != r.external_network:
                users = [f for f in await o.list(FloatingIP) if f.router == r.id]
                if users:
                    raise NeutronError(409, "RouterExternalGatewayInUseByFloatingIp",
                                       f"Gateway cannot be updated for router {r.id}, since a gateway to external "
                                       f"network {r.external_network} is required by one or more floating IPs.")
            data["external_network"], data["enable_snat"] = gateway
        return await o.replace(Router.model_validate(data), r.revision)

    obj = await with_retries(attempt)
    return {"router": router_view(obj, await nets_by_name(o))}


@router.delete("/routers/{router_id}", status_code=204)
async def delete_router(router_id: str, request: Request) -> Response:
    o = objs(request)
    r = await router_by_id(o, router_id)
    if r.interfaces:
        raise NeutronError(409, "RouterInUse", f"Router {r.id} still has ports (remove its subnets first: "
                                               "`openstack router remove subnet`)")
    await o.remove(r)
    return Response(status_code=204)


def interface_info(r: Router, leg: RouterInterface, net: Network | None) -> dict[str, Any]:
    return {"id": r.id, "tenant_id": r.project or "", "project_id": r.project or "", "port_id": leg.port_id,
            "subnet_id": leg.subnet_id, "subnet_ids": [leg.subnet_id], "network_id": net.id if net else ""}


def interface_body(body: dict[str, Any]) -> tuple[str | None, str | None]:
    check_attrs(body, {"subnet_id", "port_id"})
    subnet_id, port_id = body.get("subnet_id") or None, body.get("port_id") or None
    if not isinstance(subnet_id, str | None) or not isinstance(port_id, str | None):
        raise bad_request("Bad router request: subnet_id and port_id are ids (strings).")
    if bool(subnet_id) == bool(port_id):
        raise bad_request("Bad router request: Either subnet_id or port_id must be specified (not both).")
    return subnet_id, port_id


async def raw_body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise bad_request("Malformed request body: the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("Malformed request body: a JSON object is expected")
    return data


@router.put("/routers/{router_id}/add_router_interface")
async def add_interface(router_id: str, request: Request) -> dict:
    subnet_id, port_id = interface_body(await raw_body(request))
    o = objs(request)
    port: Endpoint | None = None
    if port_id:
        port = await port_by_id(o, port_id)
        if port.host or port.interface:
            raise NeutronError(409, "PortInUse", f"Port {port_id} is bound to a host; a router interface port "
                                                 "must be unbound.")
        v4 = [ip for ip in port.ips if ipaddress.ip_address(ip).version == 4]
        if len(v4) != 1:
            raise bad_request(f"Bad router request: Router port must have exactly one fixed IPv4 address (port "
                              f"{port_id} has {len(v4)}).")
        net = (await nets_by_name(o)).get(port.network)
        sub = next((s for s in (net.subnets if net else []) if in_cidr(v4[0], s.cidr)), None)
        if net is None or sub is None:
            raise bad_request(f"Bad router request: port {port_id}'s address is in no subnet of its network.")
        ip = v4[0]
    else:
        net, sub = await subnet_by_id(o, subnet_id or "")
        if not sub.gateway:
            raise bad_request(f"Bad router request: Subnet for router interface must have a gateway IP (subnet "
                              f"{sub.id} has none).")
        ip = sub.gateway
    if ipaddress.ip_network(sub.cidr).version != 4:
        raise bad_request(f"Bad router request: subnet {sub.id} is IPv6; Tether routers route IPv4 only.")
    if net.external:
        raise bad_request(f"Bad router request: subnet {sub.id} is on an external network; set it as the router's "
                          "gateway instead (`openstack router set --external-gateway`).")

    async def attempt() -> tuple[Router, RouterInterface]:
        r = await router_by_id(o, router_id)
        if any(leg.subnet_id == sub.id for leg in r.interfaces):
            raise bad_request(f"Bad router request: Router already has a port on subnet {sub.id}.")
        for other in await o.list(Router):
            if other.id != r.id and any(leg.subnet_id == sub.id and leg.ip == ip for leg in other.interfaces):
                raise NeutronError(409, "IpAddressInUse", f"Unable to complete operation for network {net.id}. The "
                                                          f"IP address {ip} is in use (router {other.id}).")
        if any(ipaddress.ip_network(leg.cidr).overlaps(ipaddress.ip_network(sub.cidr)) for leg in r.interfaces):
            raise bad_request(f"Bad router request: Cidr {sub.cidr} of subnet {sub.id} overlaps with another subnet "
                              f"of router {r.id}.")
        leg = RouterInterface(subnet_id=sub.id, network=net.name, cidr=sub.cidr, ip=ip,
                              **({"port_id": port.id} if port else {}))
        r.interfaces = [*r.interfaces, leg]
        return await o.replace(Router.model_validate(r.model_dump()), r.revision), leg

    r, leg = await with_retries(attempt)
    if port is not None:  # Neutron: the port now belongs to the router
        owner = port.owner.model_copy(update={"device_owner": ROUTER_INTERFACE, "device_id": r.id})
        await o.update_endpoint(port.id, {"owner": owner.model_dump()})
    return interface_info(r, leg, net)


@router.put("/routers/{router_id}/remove_router_interface")
async def remove_interface(router_id: str, request: Request) -> dict:
    subnet_id, port_id = interface_body(await raw_body(request))
    o = objs(request)

    async def attempt() -> tuple[Router, RouterInterface]:
        r = await router_by_id(o, router_id)
        leg = next((x for x in r.interfaces if (x.subnet_id == subnet_id if subnet_id else x.port_id == port_id)),
                   None)
        if leg is None:
            if subnet_id:
                raise NeutronError(404, "RouterInterfaceNotFoundForSubnet",
                                   f"Router {r.id} has no interface on subnet {subnet_id}")
            raise NeutronError(404, "RouterInterfaceNotFound", f"Router {r.id} does not have an interface with id "
                                                               f"{port_id}")
        users = [f for f in await o.list(FloatingIP)
                 if f.router == r.id and f.fixed_ip and in_cidr(f.fixed_ip, leg.cidr)]
        if users:
            raise NeutronError(409, "RouterInterfaceInUseByFloatingIP",
                               f"Router interface for subnet {leg.subnet_id} on router {r.id} cannot be deleted, as it "
                               f"is required by one or more floating IPs ({users[0].address}).")
        r.interfaces = [x for x in r.interfaces if x is not leg]
        return await o.replace(Router.model_validate(r.model_dump()), r.revision), leg

    r, leg = await with_retries(attempt)
    nets = await nets_by_name(o)
    if await o.get(Endpoint, leg.port_id) is not None:  # added by port: Neutron deletes the port with the interface
        await o.delete_endpoint(leg.port_id)
    return interface_info(r, leg, nets.get(leg.network))


# --- router interface ports, as the port API shows them ---------------------------------------------

def interface_port_view(r: Router, leg: RouterInterface, net: Network | None) -> dict[str, Any]:
    from tether.calc.names import neutron_mac

    return {
        "id": leg.port_id, "name": "", "network_id": net.id if net else leg.network,
        "tenant_id": r.project or "", "project_id": r.project or "", "mac_address": neutron_mac(leg.port_id),
        "fixed_ips": [{"subnet_id": leg.subnet_id, "ip_address": leg.ip}], "allowed_address_pairs": [],
        "security_groups": [], "device_id": r.id, "device_owner": ROUTER_INTERFACE, "binding:host_id": "",
        "binding:profile": {}, "binding:vif_type": "distributed", "binding:vif_details": {},
        "binding:vnic_type": "normal", "status": "ACTIVE", "admin_state_up": True, "port_security_enabled": False,
        "description": "", "tags": [], "extra_dhcp_opts": [], "dns_name": "", "qos_policy_id": None, **stamps(r),
    }


async def interface_ports(o: Objects, nets: dict[str, Network]) -> list[dict[str, Any]]:
    """Router interfaces added by subnet (no endpoint of their own), shown as Neutron's ports."""
    out = []
    for r in await o.list(Router):
        for leg in r.interfaces:
            if await o.get(Endpoint, leg.port_id) is None:
                out.append(interface_port_view(r, leg, nets.get(leg.network)))
    return out


async def interface_port(o: Objects, port_id: str) -> dict[str, Any] | None:
    for r in await o.list(Router):
        for leg in r.interfaces:
            if leg.port_id == port_id:
                return interface_port_view(r, leg, (await nets_by_name(o)).get(leg.network))
    return None


async def subnet_router(o: Objects, subnet_id: str) -> Router | None:
    return next((r for r in await o.list(Router) if any(leg.subnet_id == subnet_id for leg in r.interfaces)), None)


async def release_port(o: Objects, ep: Endpoint) -> None:
    """What deleting a port does to L3: Neutron's own ports are refused; floating IPs on it are disassociated."""
    if (ep.owner.device_owner or "") in OWNED_BY_L3:
        raise NeutronError(409, "PortInUse", f"Port {ep.id} cannot be deleted directly via the port API: it has "
                                             f"device owner {ep.owner.device_owner} (remove the router interface or "
                                             "delete the floating IP).")
    for f in await o.list(FloatingIP):
        if f.endpoint == ep.id:
            await o.replace(f.model_copy(update={"endpoint": None, "fixed_ip": None, "router": None}), f.revision)


# --- floating IPs ----------------------------------------------------------------------------------

FIP_ATTRS = {"floating_network_id", "floating_ip_address", "port_id", "fixed_ip_address", "subnet_id",
             "description", "tenant_id", "project_id", "tags", "dns_name", "dns_domain", "qos_policy_id",
             "distributed"}


def fip_view(f: FloatingIP, nets: dict[str, Network]) -> dict[str, Any]:
    net = nets.get(f.network)
    return {
        "id": f.id, "floating_ip_address": f.address, "floating_network_id": net.id if net else f.network,
        "router_id": f.router, "port_id": f.endpoint, "fixed_ip_address": f.fixed_ip,
        "status": "ACTIVE" if f.endpoint else "DOWN", "tenant_id": f.project or "", "project_id": f.project or "",
        "description": f.description, "tags": list(f.tags), "port_details": None, "dns_name": "", "dns_domain": "",
        "qos_policy_id": None, "port_forwardings": [], **stamps(f),
    }


def refuse_fip_extras(body: dict[str, Any]) -> None:
    for attr, why in (("dns_name", "DNS names of floating IPs are not implemented"),
                      ("dns_domain", "DNS names of floating IPs are not implemented"),
                      ("qos_policy_id", "QoS policies are not implemented"),
                      ("distributed", "every floating IP is distributed (NATed on its port's host)")):
        if body.get(attr) not in (None, "", True if attr == "distributed" else None):
            raise bad_request(f"Invalid input for {attr}. Reason: {str(body[attr])[:60]!r} is not supported: {why}. "
                              f"Leave {attr} out.")


async def association(o: Objects, f_network: str, port_id: str, fixed: Any, fip_id: str | None
                      ) -> tuple[Endpoint, str, Router]:
    """The port, fixed address and router a floating IP of `f_network` would map to, or Neutron's
    error: the port's subnet must be on a router whose gateway is that external network."""
    ep = await port_by_id(o, port_id)
    v4 = [ip for ip in ep.ips if ipaddress.ip_address(ip).version == 4]
    if fixed:
        if fixed not in ep.ips:
            raise bad_request(f"Bad floatingip request: Port {port_id} does not have fixed ip {str(fixed)[:60]}.")
        if ipaddress.ip_address(fixed).version != 4:
            raise bad_request(f"Bad floatingip request: fixed IP {fixed} is IPv6; floating IPs map IPv4 addresses.")
        ip = str(fixed)
    elif len(v4) == 1:
        ip = v4[0]
    elif not v4:
        raise bad_request(f"Bad floatingip request: Port {port_id} does not have any IPv4 fixed IP.")
    else:
        raise bad_request(f"Bad floatingip request: Port {port_id} has multiple fixed IPv4 addresses. Must provide a "
                          "specific IPv4 address when assigning a floating IP.")
    if (ep.owner.device_owner or "").startswith("network:"):
        raise bad_request(f"Bad floatingip request: Port {port_id} is a network port ({ep.owner.device_owner}).")
    r = next((r for r in await o.list(Router) if r.external_network == f_network
              and any(in_cidr(ip, leg.cidr) for leg in r.interfaces)), None)
    if r is None:
        nets = await nets_by_name(o)
        ext = nets.get(f_network)
        raise NeutronError(404, "ExternalGatewayForFloatingIPNotFound",
                           f"External network {ext.id if ext else f_network} is not reachable from subnet of port "
                           f"{port_id}. Therefore, cannot associate Port {port_id} with a Floating IP (add its subnet "
                           "to a router whose gateway is that network).")
    for other in await o.list(FloatingIP):
        if other.id != fip_id and other.endpoint == ep.id and other.fixed_ip == ip:
            raise NeutronError(409, "FloatingIPPortAlreadyAssociated",
                               f"Cannot associate floating IP {other.address} ({other.id}) with port {port_id} using "
                               f"fixed IP {ip}, as that fixed IP already has a floating IP on external network "
                               f"{f_network}.")
    return ep, ip, r


@router.get("/floatingips")
async def list_fips(request: Request) -> dict:
    o = objs(request)
    nets = await nets_by_name(o)
    return {"floatingips": filtered(request, [fip_view(f, nets) for f in await o.list(FloatingIP)])}


@router.get("/floatingips/{fip_id}")
async def get_fip(fip_id: str, request: Request) -> dict:
    o = objs(request)
    return {"floatingip": fip_view(await fip_by_id(o, fip_id), await nets_by_name(o))}


@router.post("/floatingips", status_code=201)
async def create_fip(request: Request) -> dict:
    body = await body_of(request, "floatingip")
    check_attrs(body, FIP_ATTRS)
    refuse_fip_extras(body)
    o = objs(request)
    net = await external_network(o, body.get("floating_network_id"))
    fields = described_fields(body)
    fip_id = new_id()
    mapped = None
    if body.get("port_id"):
        mapped = await association(o, net.name, str(body["port_id"]), body.get("fixed_ip_address"), fip_id)
    elif body.get("fixed_ip_address"):
        raise bad_request("Bad floatingip request: fixed_ip_address needs a port_id.")
    requested = []
    if body.get("floating_ip_address"):
        requested = [str(body["floating_ip_address"])]
        try:
            v4 = ipaddress.ip_address(requested[0]).version == 4
        except ValueError:
            v4 = False
        if not v4:
            raise bad_request(f"Invalid input for floating_ip_address. Reason: {requested[0][:60]!r} is not an IPv4 "
                              "address.")
    if not any(ipaddress.ip_network(s.cidr).version == 4 for s in net.subnets):
        raise bad_request(f"Bad floatingip request: network {net.id} has no IPv4 subnet to take a floating IP from.")
    if body.get("subnet_id"):
        n, sub = await subnet_by_id(o, str(body["subnet_id"]))
        if n.id != net.id:
            raise bad_request(f"Bad floatingip request: subnet {sub.id} is not on network {net.id}.")
        if requested and not in_cidr(requested[0], sub.cidr):
            raise bad_request(f"Bad floatingip request: {requested[0]} is not in subnet {sub.id}.")
        if not requested and len(net.subnets) > 1:
            raise bad_request("Bad floatingip request: choosing the subnet of a floating IP is not implemented when "
                              "the external network has several subnets; give floating_ip_address.")
    allocation = Endpoint(name=f"fip-{fip_id[:8]}", network=net.name, ips=requested,
                          owner=Owner(device_owner=FLOATINGIP_OWNER, device_id=fip_id), anti_spoofing=False)
    try:
        held, _ = await o.create_endpoint(allocation)
    except ApiError as e:
        if e.status == 409 and "already in use" in e.detail:
            raise NeutronError(409, "IpAddressAlreadyAllocated", e.detail) from None
        if "full" in e.detail:
            raise NeutronError(409, "IpAddressGenerationFailure", f"No more IP addresses available on network "
                                                                   f"{net.id}.") from None
        raise
    address = next((ip for ip in held.ips if ipaddress.ip_address(ip).version == 4), None)
    try:
        if address is None:
            raise bad_request(f"Bad floatingip request: no IPv4 address was taken on network {net.id}.")
        f = FloatingIP(id=fip_id, name=address, network=net.name, address=address, allocation=held.id,
                       project=project_of(body), **fields,
                       **({"endpoint": mapped[0].id, "fixed_ip": mapped[1], "router": mapped[2].id} if mapped else {}))
        obj = await o.create(f)
    except BaseException:  # nothing left behind: the address goes back
        await o.delete_endpoint(held.id)
        raise
    return {"floatingip": fip_view(obj, await nets_by_name(o))}


@router.put("/floatingips/{fip_id}")
async def update_fip(fip_id: str, request: Request) -> dict:
    body = await body_of(request, "floatingip")
    check_attrs(body, FIP_ATTRS)
    refuse_fip_extras(body)
    changeable = {"port_id", "fixed_ip_address", "description", "tags", "distributed"}
    if set(body) - changeable:
        raise bad_request(f"Cannot update read-only attribute(s) {', '.join(sorted(set(body) - changeable))}")
    o = objs(request)

    async def attempt() -> FloatingIP:
        f = await fip_by_id(o, fip_id)
        data = f.model_dump()
        data.update(described_fields(body))
        if "port_id" in body:
            if body["port_id"]:
                ep, ip, r = await association(o, f.network, str(body["port_id"]), body.get("fixed_ip_address"), f.id)
                data.update(endpoint=ep.id, fixed_ip=ip, router=r.id)
            else:
                data.update(endpoint=None, fixed_ip=None, router=None)
        elif body.get("fixed_ip_address"):
            raise bad_request("Bad floatingip request: fixed_ip_address needs a port_id.")
        return await o.replace(FloatingIP.model_validate(data), f.revision)

    obj = await with_retries(attempt)
    return {"floatingip": fip_view(obj, await nets_by_name(o))}


@router.delete("/floatingips/{fip_id}", status_code=204)
async def delete_fip(fip_id: str, request: Request) -> Response:
    o = objs(request)
    f = await fip_by_id(o, fip_id)
    await o.remove(f)
    await o.delete_endpoint(f.allocation)
    return Response(status_code=204)
