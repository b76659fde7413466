"""A veth pair left in the host namespace for a container runtime to take one end (Docker's remote
driver contract: dockerd moves `peer` into the container and renames it; it also sets the address).

The host side is configured like a pod's: proxy ARP (it answers for the link-local gateway) and
the endpoint's MTU. It stays down: the agent's next apply (Join kicks one) creates the container's
ingress chain, then brings the host side up and adds the /32 routes (`links.raise_interfaces`).
"""

from __future__ import annotations

import contextlib

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.dataplane.pods import AttachError, get_link, host_side_sysctls


def create_veth(host_ifname: str, peer_ifname: str, *, mtu: int, peer_mac: str | None) -> str:
    """Create (or re-create) the pair and return the host side's MAC. Retry-safe."""
    with IPRoute() as ipr:
        try:
            for name in (host_ifname, peer_ifname):
                old = get_link(ipr, name)
                if old is not None:
                    ipr.link("del", index=old["index"])
            peer: dict = {"ifname": peer_ifname, "mtu": mtu}
            if peer_mac:
                peer["address"] = peer_mac
            ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer)
            host = get_link(ipr, host_ifname)
            if host is None:
                raise AttachError(f"veth {host_ifname} vanished while it was being created")
            host_side_sysctls(host_ifname)
            return host.get("IFLA_ADDRESS")
        except NetlinkError as e:
            with contextlib.suppress(NetlinkError):
                link = get_link(ipr, host_ifname)
                if link is not None:
                    ipr.link("del", index=link["index"])
            raise AttachError(f"netlink error while creating veth {host_ifname}/{peer_ifname}: {e}") from e


def delete_link(name: str) -> bool:
    """Remove a link (a veth takes its peer with it); False if it was not there."""
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        if link is None:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=link["index"])
        return True
