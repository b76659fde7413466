"""Checks that need more than one object's schema: references and Kubernetes policy rules."""

from __future__ import annotations

import ipaddress

from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy
from tether.server.objects import ApiError, Objects


async def require_namespace(o: Objects, ns: str) -> None:
    if await o.get(Namespace, ns) is None:
        raise ApiError(400, f"namespace {ns!r} does not exist; create it first "
                            f"(`tether apply -f` a Namespace manifest named {ns!r})")


def check_policy(pol: NetworkPolicy) -> None:
    """Reject a NetworkPolicy spec the Kubernetes API server would reject, with its wording."""
    from tether.calc.k8s_validation import PolicyInvalid
    from tether.calc.k8s_validation import check_policy as k8s_check

    try:
        k8s_check(pol.name, pol.spec)
    except PolicyInvalid as e:
        raise ApiError(422, str(e)) from None


# --- the addresses the kernel sees (issue 22): pure checks over the registered hosts and networks ---------

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network
RESERVED: tuple[tuple[IpNet, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "'this network' (0.0.0.0/8), which the kernel does not route"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16), where Tether puts the VTEP, DNS and "
                                             "gateway addresses"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address"),
    (ipaddress.ip_network("::/127"), "the unspecified and loopback addresses (::/127)"),
    (ipaddress.ip_network("fe80::/10"), "link-local (fe80::/10)"),
    (ipaddress.ip_network("ff00::/8"), "multicast (ff00::/8)"),
)


def underlay_of(h: Host) -> IpNet:
    """The host's underlay subnet, or its underlay address alone when it did not say."""
    return ipaddress.ip_network(h.underlay_cidr or h.underlay_ip, strict=False)


def same_underlay(a: Host, b: Host) -> bool:
    """Whether `direct` routes between two hosts can work (each on-link for the other). Unknown (no
    underlay_cidr on either) counts as yes: only what is known not to work is refused. Underlay
    addresses of two families never are: neither host has an address of the other's family."""
    if ipaddress.ip_address(a.underlay_ip).version != ipaddress.ip_address(b.underlay_ip).version:
        return False
    if a.underlay_cidr and ipaddress.ip_address(b.underlay_ip) not in underlay_of(a):
        return False
    return not (b.underlay_cidr and ipaddress.ip_address(a.underlay_ip) not in underlay_of(b))


def check_subnet_ranges(net: Network, new_cidrs: list[str], hosts: list[Host], service_cidr: IpNet,
                        vtep_cidr: IpNet, service_cidr6: IpNet | None = None) -> None:
    """Refuse a subnet whose addresses would collide with what the kernel already routes elsewhere."""
    for cidr in new_cidrs:
        a = ipaddress.ip_network(cidr)
        for r, why in RESERVED:
            if a.version == r.version and a.overlaps(r):
                raise ApiError(400, f"subnet {a} of network {net.name!r} overlaps {why}; pods there would not be "
                                    "reachable: choose another --subnet")
        ranges = [(service_cidr, "the service range"), (vtep_cidr, "the VTEP range")]
        if service_cidr6 is not None:
            ranges.append((service_cidr6, "the IPv6 service range"))
        for r, what in ranges:
            if a.version == r.version and a.overlaps(r):
                raise ApiError(400, f"subnet {a} of network {net.name!r} overlaps {what} {r} (a pod could get a "
                                    "service or tunnel address); choose another --subnet")
        for h in hosts:
            u = underlay_of(h)
            if a.version == u.version and a.overlaps(u):
                raise ApiError(409, f"subnet {a} of network {net.name!r} overlaps the underlay {u} of host "
                                    f"{h.name!r}; a pod could get a host's address and cut it off: choose another "
                                    "--subnet")


def check_direct(net: Network, hosts: list[Host]) -> None:
    """`direct` needs every host on-link with every other one; across subnets only `auto` can work."""
    if net.encap != "direct":
        return
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            if (":" in a.underlay_ip) != (":" in b.underlay_ip):
                raise ApiError(409, f"network {net.name!r} cannot use encap 'direct': hosts {a.name!r} "
                                    f"({a.underlay_ip}) and {b.name!r} ({b.underlay_ip}) are on different underlay "
                                    "families (IPv4 and IPv6), and no encap routes between them; give every host an "
                                    "underlay address of one family")
            if not same_underlay(a, b):
                raise ApiError(409, f"network {net.name!r} cannot use encap 'direct': hosts {a.name!r} "
                                    f"({a.underlay_ip}) and {b.name!r} ({b.underlay_ip}) are on different underlay "
                                    "subnets; use 'auto', which routes directly inside a subnet and falls back to "
                                    "VXLAN across subnets")


def check_host_underlay(host: Host, hosts: list[Host], networks: list[Network]) -> None:
    """A host may not join with an underlay that a network's pods use, nor split a `direct` network."""
    u = underlay_of(host)
    for n in networks:
        for s in n.subnets:
            b = ipaddress.ip_network(s.cidr)
            if b.version == u.version and b.overlaps(u):
                raise ApiError(409, f"host {host.name!r}: its underlay {u} overlaps subnet {b} of network "
                                    f"{n.name!r}; pods and hosts would share addresses: move the network (delete and "
                                    "recreate it with another --subnet) before adding this host")
    direct = [n.name for n in networks if n.encap == "direct"]
    if direct:
        for other in hosts:
            if other.name != host.name and (":" in host.underlay_ip) != (":" in other.underlay_ip):
                raise ApiError(409, f"host {host.name!r} ({host.underlay_ip}) has an underlay address of another "
                                    f"family than {other.name!r} ({other.underlay_ip}), and network {direct[0]!r} "
                                    "uses encap 'direct': no encap routes between IPv4 and IPv6 underlays; give "
                                    "every host an underlay address of one family")
            if other.name != host.name and not same_underlay(host, other):
                raise ApiError(409, f"host {host.name!r} ({host.underlay_ip}) is on another underlay subnet than "
                                    f"{other.name!r} ({other.underlay_ip}), and network {direct[0]!r} uses encap "
                                    "'direct', which cannot cross subnets; change that network to 'auto' first")


def check_endpoint_interface(ep: Endpoint) -> None:
    """The server derives the host-side device from the owner; any other name is refused."""
    from tether.calc.names import endpoint_interface, endpoint_mac

    want = endpoint_interface(ep.owner.type, ep.id, ep.owner.container_id, ep.owner.ifname)
    if ep.interface is not None and ep.interface != want:
        raise ApiError(400, f"interface {ep.interface!r} is refused: the server assigns the host-side device name "
                            f"({want!r} for a {ep.owner.type!r} endpoint with this id and owner); leave interface out")
    ep.interface = want
    if ep.mac is None:  # the MAC its plugging path picks, known in advance (anti-spoofing pins it)
        ep.mac = endpoint_mac(ep.owner.type, ep.id, ep.owner.container_id, ep.owner.ifname)


def check_owner_change(old: Endpoint, new: Endpoint) -> None:
    """What names a device or a namespace may not change after create: owner identity and host.

    Neutron binds a port after creating it (api -> vm, host unset -> set) and unbinds it; Docker learns
    its container's id later. Anything else (another container, another host, another type) is a new
    endpoint."""
    a, b = old.owner, new.owner
    if a.type != b.type and {a.type, b.type} != {"api", "vm"}:
        raise ApiError(409, f"owner.type of endpoint {old.id!r} is {a.type!r} and cannot change; create a new "
                            "endpoint instead")
    for f in ("container_id", "ifname", "docker_endpoint_id"):
        was, now = getattr(a, f), getattr(b, f)
        if was is not None and now != was:
            raise ApiError(409, f"owner.{f} of endpoint {old.id!r} is {was!r} and cannot change; create a new "
                                "endpoint instead")
    if old.host is not None and new.host is not None and new.host != old.host:
        raise ApiError(409, f"endpoint {old.id!r} is on host {old.host!r} and cannot move to {new.host!r}; unbind "
                            "it first (Neutron) or create a new endpoint")
    if old.host is not None and new.host is None and a.type not in ("api", "vm"):
        raise ApiError(409, f"host of {a.type} endpoint {old.id!r} cannot be cleared; delete the endpoint instead")
