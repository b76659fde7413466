"""A veth pair left in the host namespace for a container runtime to take one end (Docker's remote
driver contract: dockerd moves `peer` into the container and renames it; it also sets the address).

The host side is configured like a pod's: proxy ARP (it answers for the link-local gateway),
the endpoint's MTU, and /32 routes to the container's addresses, so the first packet works before
the next plan pass.
"""

from __future__ import annotations

import contextlib
import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.dataplane.plan import RTPROT_TETHER
from tether.dataplane.pods import RT_SCOPE_LINK, AttachError, get_link, host_side_sysctls


def create_veth(host_ifname: str, peer_ifname: str, *, mtu: int, peer_mac: str | None, ips: list[str]) -> str:
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
            ipr.link("set", index=host["index"], state="up")
            for ip in ips:
                plen = 32 if ipaddress.ip_address(ip).version == 4 else 128
                ipr.route("replace", dst=f"{ip}/{plen}", oif=host["index"], scope=RT_SCOPE_LINK, proto=RTPROT_TETHER)
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
