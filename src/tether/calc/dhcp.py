"""Pure: what this host's dnsmasq serves its VM ports (Neutron's DHCP agent, per host).

Only VM ports (`owner.type == "vm"`) bound to this host get an entry, keyed by their MAC and the
tap they sit behind (dnsmasq tags a request with its arrival interface, so a MAC answers only on its
own port's tap), with their first IPv4 address on a subnet with `enable_dhcp`. Unknown clients get
nothing (`dhcp-ignore=tag:!known`). Per subnet: gateway (option 3), DNS servers (6: the subnet's
`dns_nameservers`, else the agent's DNS address), host routes as option 121 (with the default route:
a client that takes 121 ignores 3, RFC 3442), MTU (26), domain (15) and lease time.

dnsmasq serves a request only on an interface with an address and in a `dhcp-range` of the network
it arrived from: every tap carries `VM_DHCP_SERVER` (scope host), and `shared-network` opens each
subnet's range on that address. The ranges are on the command line (`args`: a change restarts
dnsmasq); hosts and options are files it re-reads on SIGHUP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from tether.calc.host import endpoint_mtu
from tether.calc.names import VM_DHCP_SERVER, VXLAN_OVERHEAD
from tether.calc.quarantine import problem
from tether.calc.replica import Replica
from tether.model import Endpoint, Network, Subnet

LEASE_SECONDS = 86400  # Neutron's default dhcp_lease_duration


@dataclass(frozen=True)
class DnsmasqConfig:
    args: tuple[str, ...]  # per subnet: --dhcp-range and --shared-network (a change needs a restart)
    hosts: str  # --dhcp-hostsfile (SIGHUP)
    opts: str  # --dhcp-optsfile (SIGHUP)

    @property
    def empty(self) -> bool:
        """Nothing to serve: no dnsmasq runs."""
        return not self.hosts


def subnet_tag(s: Subnet) -> str:
    return "sub-" + s.id


def dhcp_subnet(net: Network, ep: Endpoint) -> tuple[str, Subnet] | None:
    """The address a VM port is offered and its subnet: its first IPv4 address, if that address's
    subnet has DHCP (DHCPv4 hands out one address; Tether serves no DHCPv6 or router advertisements)."""
    for ip in ep.ips:
        addr = ipaddress.ip_address(ip)
        if addr.version != 4:
            continue
        for s in net.subnets:
            cidr = ipaddress.ip_network(s.cidr)
            if cidr.version == 4 and addr in cidr:
                return (ip, s) if s.enable_dhcp else None
        return None
    return None


def subnet_options(net: Network, s: Subnet, underlay_mtu: int, dns_ip: str | None,
                   overhead: int = VXLAN_OVERHEAD) -> list[str]:
    tag = f"tag:{subnet_tag(s)}"
    out = [f"{tag},option:router,{s.gateway}" if s.gateway else f"{tag},option:router"]
    servers = list(s.dns_nameservers) or ([dns_ip] if dns_ip else [])
    if servers:
        out.append(f"{tag},option:dns-server,{','.join(servers)}")
    routes = [(r.destination, r.nexthop) for r in s.host_routes if ":" not in r.destination]
    if routes:
        if s.gateway and not any(dst == "0.0.0.0/0" for dst, _ in routes):
            routes.append(("0.0.0.0/0", s.gateway))
        out.append(f"{tag},option:classless-static-route," + ",".join(f"{d},{n}" for d, n in routes))
    out.append(f"{tag},option:mtu,{endpoint_mtu(net, underlay_mtu, overhead)}")  # the tap's (vmports)
    out.append(f"{tag},option:domain-name,{net.name}.{net.dns_domain}")
    return out


def dnsmasq_config(rep: Replica, host: str, underlay_mtu: int, dns_ip: str | None,
                   lease: int = LEASE_SECONDS, overhead: int = VXLAN_OVERHEAD,
                   endpoints: Iterable[Endpoint] | None = None) -> DnsmasqConfig:
    """The dnsmasq configuration of `host` for its VM ports (see the module's docstring); `overhead`
    is VXLAN's on this host's underlay (`names.vxlan_overhead`), as for the taps; `endpoints`: the
    candidates when the caller knows this host's (default: every endpoint of `rep`)."""
    hosts: list[str] = []
    subnets: dict[str, tuple[Network, Subnet]] = {}
    for ep in sorted(rep.endpoints if endpoints is None else endpoints, key=lambda e: e.interface or ""):
        if ep.host != host or ep.owner.type != "vm" or not ep.interface or not ep.mac or not ep.admin_state_up:
            continue
        net = rep.networks.get(ep.network)
        if net is None or problem("Endpoint", ep, host) is not None or problem("Network", net, host) is not None:
            continue
        found = dhcp_subnet(net, ep)
        if found is None:
            continue
        ip, s = found
        subnets[s.id] = (net, s)
        hosts.append(f"{ep.mac.lower()},tag:{ep.interface},{ip},{ep.dns_name or ep.name},{lease}")
    args: list[str] = []
    opts: list[str] = []
    for _, (net, s) in sorted(subnets.items()):
        cidr = ipaddress.ip_network(s.cidr)
        args += [f"--dhcp-range=set:{subnet_tag(s)},{cidr.network_address},static,{cidr.netmask},{lease}",
                 f"--shared-network={VM_DHCP_SERVER},{cidr.network_address}"]
        opts += subnet_options(net, s, underlay_mtu, dns_ip, overhead)
    return DnsmasqConfig(tuple(args), "".join(h + "\n" for h in hosts), "".join(o + "\n" for o in opts))
