"""A veth pair left in the host namespace for a container runtime to take one end (Docker's remote
driver contract: dockerd moves `peer` into the container and renames it; it also sets the address).

The host side is configured like a pod's: proxy ARP (it answers for the link-local gateway) and
the endpoint's MTU. It stays down: the agent's next apply (Join kicks one) creates the container's
ingress chain, then brings the host side up and adds the /32 routes (`links.raise_interfaces`).
"""

from __future__ import annotations

import contextlib
import re

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.calc.names import POD_GATEWAY6, own_link
from tether.dataplane import rtnl_batch as nl
from tether.dataplane.pods import AttachError, get_link, host_side_sysctls
from tether.dataplane.rtnl_batch import RtnlSocket

DOCKER_PEER = re.compile(r"^tdk[0-9a-f]{1,12}$")  # docker_plugin.peer_name: the container end before dockerd takes it


def ours(name: str) -> bool:
    """A link this module may create or delete: Tether's own, or a Docker peer end it made."""
    return own_link(name) or DOCKER_PEER.match(name or "") is not None


def create_veth(host_ifname: str, peer_ifname: str, *, mtu: int, peer_mac: str | None, gateway6: bool = False) -> str:
    """Create (or re-create) the pair and return the host side's MAC. Retry-safe: a leftover of
    ours is replaced; a name that is not ours is refused (an endpoint's `interface` comes from the API).
    `gateway6`: the host side holds the IPv6 gateway fe80::1 itself, so it answers the neighbour
    discovery of a container whose namespace Tether does not configure (Docker's)."""
    for name in (host_ifname, peer_ifname):
        if not ours(name):
            raise AttachError(f"refusing to create veth {host_ifname}/{peer_ifname}: {name!r} is not a Tether "
                              "device name")
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
            if gateway6:
                with contextlib.closing(RtnlSocket()) as rt:
                    rt.run(nl.address(host["index"], POD_GATEWAY6))[0].check()
            return host.get("IFLA_ADDRESS")
        except NetlinkError as e:
            with contextlib.suppress(NetlinkError):
                link = get_link(ipr, host_ifname)
                if link is not None:
                    ipr.link("del", index=link["index"])
            raise AttachError(f"netlink error while creating veth {host_ifname}/{peer_ifname}: {e}") from e
        except OSError as e:  # the gateway address (rtnl_batch reports errors as OSError)
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=get_link(ipr, host_ifname)["index"])  # type: ignore[index]
            raise AttachError(f"cannot give {host_ifname} the IPv6 gateway address: {e}") from e


def delete_link(name: str) -> bool:
    """Remove a link of ours (a veth takes its peer with it); False if it was not there or is not ours."""
    if not ours(name):
        return False
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        if link is None:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=link["index"])
        return True
