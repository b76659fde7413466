"""Plugging a pod: a veth whose far end is created directly inside the pod's network namespace.

The pod side gets its addresses as /32 (/128), a static neighbour for the link-local gateway
169.254.1.1 (IPv6: fe80::1) pointing at the host side's MAC, and a default route through it; the host side answers
ARP by proxy and gets a /32 route. No thread ever switches namespace: netlink sockets are bound to
the pod's namespace instead.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
from dataclasses import dataclass

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.calc.names import DOCKER_PEER, POD_GATEWAY, POD_GATEWAY6, ForeignLink, own_link, require_own_link
from tether.dataplane import rtnl_batch as nl
from tether.dataplane.netns import ipr_in
from tether.dataplane.rtnl_batch import RT_SCOPE_LINK, RtnlSocket

log = logging.getLogger("tether.dataplane")
LOOPBACK_INDEX = 1  # `lo` is interface 1 in every network namespace


class AttachError(Exception):
    pass


@dataclass(frozen=True)
class PodInterface:
    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    ips: tuple[str, ...]
    mtu: int


def get_link(ipr: IPRoute, ifname: str) -> dict | None:
    """The link named `ifname`, asked for by name: O(1), where `link_lookup` dumps every link (slow
    with hundreds of pods on a host)."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as e:
        if e.code == 19:  # ENODEV
            return None
        raise


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    msg = get_link(ipr, ifname)
    return msg["index"] if msg else None


def write_sysctl(path: str, value: str) -> None:
    full = os.path.join("/proc/sys", path)
    try:
        with open(full) as f:
            if f.read().strip() == value:
                return
        with open(full, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # the device is gone (a pod removed meanwhile): nothing to set
    except OSError as e:
        log.warning("cannot set sysctl %s to %s: %s", path, value, e.strerror or e)


def host_side_sysctls(ifname: str) -> None:
    """Proxy ARP on, rp_filter off: only ever on a link of our own (the name is also a path)."""
    require_own_link(ifname, "set proxy_arp/rp_filter on")
    write_sysctl(f"net/ipv4/conf/{ifname}/proxy_arp", "1")
    write_sysctl(f"net/ipv4/neigh/{ifname}/proxy_delay", "0")
    write_sysctl(f"net/ipv4/conf/{ifname}/rp_filter", "0")




def ours(name: str) -> bool:
    """A link a plug may create or delete: Tether's own, or a Docker peer end it made."""
    return own_link(name) or DOCKER_PEER.match(name or "") is not None


@dataclass
class PodLink:
    """A pod's veth, made but without addresses yet: the agent makes it while the server allocates
    the addresses (see CniServer.add), then `address_pod` finishes. It keeps the netlink sockets
    (host side, pod side: None for a peer left in the host namespace) open until then."""

    host: RtnlSocket
    pod: RtnlSocket | None
    host_ifname: str
    host_index: int
    host_mac: str
    ifname: str
    pod_index: int
    mac: str
    mtu: int

    def close(self) -> None:
        if self.pod is not None:
            self.pod.close()
        self.host.close()

    def remove(self) -> None:
        """Undo: deleting the host side takes the pod side with it."""
        with contextlib.suppress(OSError):
            self.host.run(nl.del_link(self.host_index))

    def discard(self) -> None:
        """Remove the veth and close the sockets: the ADD it was made for failed."""
        self.remove()
        self.close()


def plug_link(*, pod_netns: str | None, ifname: str, host_ifname: str, mac: str | None, mtu: int,
              gateway6: bool = False) -> PodLink:
    """Create the veth, its far end `ifname` directly in the pod's namespace and up (the CNI ADD),
    or with `pod_netns` None left down in this namespace for a runtime to move (Docker's remote
    driver contract: dockerd moves the peer into the container, renames it and addresses it). The
    host side stays down, so the endpoint can send nothing until the agent has applied the plan with
    its ingress chain (anti-spoofing) and brought it up (`links.raise_interfaces`).
    `gateway6`: the host side holds the IPv6 gateway fe80::1 itself, so it answers the neighbour
    discovery of a container whose namespace Tether does not configure (Docker's).

    Retry-safe: a leftover of an earlier attempt is replaced (in this namespace: both names).
    Two batches of netlink requests (rtnl_batch: create and look up the host side; bring up `lo`
    and the pod side, look it up), nothing looked up before the create: a name clash is sorted out
    when the kernel reports it. On failure nothing is left: a veth made before the failure is
    removed, the sockets closed. A name that is not ours (an endpoint's `interface` comes from the
    API) fails the request: such a link is never created nor deleted."""
    try:
        require_own_link(host_ifname, "create")
    except ForeignLink as e:
        raise AttachError(str(e)) from None
    if pod_netns is None and not ours(ifname):
        raise AttachError(f"refusing to create veth {host_ifname}/{ifname}: {ifname!r} is not a Tether device name")
    try:
        fd = os.open(pod_netns, os.O_RDONLY) if pod_netns is not None else None
    except OSError as e:
        raise AttachError(f"cannot open network namespace {pod_netns}: {e.strerror}") from e
    host = pod = None
    made = False
    try:
        host = RtnlSocket()
        pod = RtnlSocket(pod_netns) if pod_netns is not None else None
        for attempt in (1, 2):
            create, outside = host.run(nl.veth(host_ifname, ifname, fd, mtu, mac), nl.get_link(host_ifname))
            if create.error != errno.EEXIST or attempt == 2:
                break
            if pod is None:  # both names are ours here: remove what an earlier attempt left, again
                host.run(nl.del_link(host_ifname), nl.del_link(ifname))
                continue
            if not host.run(nl.del_link(host_ifname))[0].error:
                continue  # it was the host side of an earlier attempt (its peer went with it): again
            if not pod.run(nl.get_link(ifname))[0].error:
                raise AttachError(f"interface {ifname} already exists in {pod_netns}; pick another CNI_IFNAME")
        create.check()
        made = True
        out = outside.check().link
        host_side_sysctls(host_ifname)
        if out is None:
            raise AttachError(f"the veth {host_ifname}/{ifname} vanished while it was being plugged")
        if gateway6:
            (r,) = host.run(nl.address(out.index, POD_GATEWAY6))
            if r.error:
                raise AttachError(f"cannot give {host_ifname} the IPv6 gateway address: {os.strerror(r.error)}")
        if pod is None:
            return PodLink(host, None, host_ifname, out.index, out.mac or "", ifname, 0, mac or "", mtu)
        replies = pod.run(nl.link_up(LOOPBACK_INDEX), nl.link_up(ifname), nl.get_link(ifname))
        inside = [r.check() for r in replies][-1].link
        if inside is None:
            raise AttachError(f"the veth {host_ifname}/{ifname} vanished while it was being plugged")
        return PodLink(host, pod, host_ifname, out.index, out.mac or "", ifname, inside.index, inside.mac or "", mtu)
    except BaseException as e:
        if made and host is not None:
            with contextlib.suppress(OSError):
                host.run(nl.del_link(host_ifname))
        for sock in (pod, host):
            if sock is not None:
                sock.close()
        if isinstance(e, OSError) and not isinstance(e, AttachError):
            raise AttachError(f"netlink error while plugging {host_ifname}: {e}") from e
        raise
    finally:
        if fd is not None:
            os.close(fd)


def address_pod(link: PodLink, ips: list[str]) -> PodInterface:
    """Give a plugged pod its addresses (/32, /128), the gateway neighbour and default route inside,
    in one batch. The /32 routes to it on the host come with its host side, which the agent brings
    up once the pod's ingress chain exists (`links.raise_interfaces`). On failure the veth is
    removed; the sockets are closed either way."""
    assert link.pod is not None, "address_pod: the veth's far end was left in the host namespace"
    idx = link.pod_index
    inside = [nl.address(idx, ip) for ip in ips]
    if any(ipaddress.ip_address(ip).version == 4 for ip in ips):
        inside += [nl.route(f"{POD_GATEWAY}/32", idx, scope=RT_SCOPE_LINK),
                   nl.permanent_neighbour(idx, POD_GATEWAY, link.host_mac),
                   nl.route("0.0.0.0/0", idx, gateway=POD_GATEWAY)]
    if any(ipaddress.ip_address(ip).version == 6 for ip in ips):
        # the link-local gateway fe80::1, pinned to the host side's MAC: the pod never needs an
        # answer to neighbour discovery for it (the equivalent of the host's proxy ARP for IPv4)
        inside += [nl.permanent_neighbour(idx, POD_GATEWAY6, link.host_mac),
                   nl.route("::/0", idx, gateway=POD_GATEWAY6)]
    try:
        for r in link.pod.run(*inside):
            r.check()
        return PodInterface(link.host_ifname, link.host_mac, link.ifname, link.mac, tuple(ips), link.mtu)
    except BaseException as e:
        link.remove()
        if isinstance(e, OSError):
            raise AttachError(f"netlink error while addressing {link.host_ifname}: {e}") from e
        raise
    finally:
        link.close()


def attach_pod(*, pod_netns: str, ifname: str, host_ifname: str, ips: list[str], mac: str | None,
               mtu: int) -> PodInterface:
    """Create and configure the pod's interface in one go (`plug_link` then `address_pod`)."""
    return address_pod(plug_link(pod_netns=pod_netns, ifname=ifname, host_ifname=host_ifname, mac=mac, mtu=mtu),
                       ips)


def detach_pod(host_ifname: str) -> bool:
    """Remove the pod's veth (both ends go together) and its routes; True if something was removed.
    Missing interfaces and vanished namespaces are fine: DEL must be idempotent. A name that is not
    Tether's (an endpoint's `interface` comes from the API) is never deleted: False."""
    return own_link(host_ifname) and _delete(host_ifname)


def delete_link(name: str) -> bool:
    """Remove a link of ours or a Docker peer end (a veth takes its peer with it); False if it was
    not there or is not ours."""
    return ours(name) and _delete(name)


def _delete(name: str) -> bool:
    with contextlib.closing(RtnlSocket()) as rt:
        return not rt.run(nl.del_link(name))[0].error  # routes through it disappear with it


def check_pod(*, pod_netns: str, ifname: str, host_ifname: str, ips: list[str]) -> list[str]:
    """Problems with a pod's interface (empty list: all as expected), for CNI CHECK."""
    problems = []
    with IPRoute() as ipr:
        if _lookup(ipr, host_ifname) is None:
            problems.append(f"host interface {host_ifname} is missing")
    if not os.path.exists(pod_netns):
        return [*problems, f"network namespace {pod_netns} does not exist"]
    with ipr_in(pod_netns) as pod:
        idx = _lookup(pod, ifname)
        if idx is None:
            return [*problems, f"interface {ifname} is missing in {pod_netns}"]
        have = {a.get("IFA_ADDRESS") for a in pod.get_addr(index=idx)}
        for ip in ips:
            if ip not in have:
                problems.append(f"address {ip} is missing on {ifname}")
        if any(":" not in ip for ip in ips) and not any(r.get("RTA_GATEWAY") == POD_GATEWAY
                                                        for r in pod.get_routes(family=2)):
            problems.append(f"default route via {POD_GATEWAY} is missing")
        if any(":" in ip for ip in ips) and not any(r.get("RTA_GATEWAY") == POD_GATEWAY6
                                                    for r in pod.get_routes(family=10)):
            problems.append(f"IPv6 default route via {POD_GATEWAY6} is missing")
    return problems
