"""Address helpers every compiler shares: which IP version, which subnets, a CIDR parsed once."""

from __future__ import annotations

import functools
import ipaddress

from tether.model import Network


def ip_version(address: str) -> int:
    """4 or 6 for a valid address or CIDR (without parsing it)."""
    return 6 if ":" in address else 4


def v4_subnets(net: Network) -> list[str]:
    return [s.cidr for s in net.subnets if ip_version(s.cidr) == 4]


@functools.lru_cache(maxsize=1 << 14)
def network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR or address, parsed once (host bits allowed)."""
    return ipaddress.ip_network(cidr, strict=False)
