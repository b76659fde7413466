"""VM interfaces (VIFs), named as os-vif names a tap: `tap<first 11 chars of the port id>`.

Two kinds, chosen by the port's `binding:profile`:
- no `netns` (a real VM): a persistent tap device on the host, created by the agent unless it exists
  already (made by Nova/libvirt or by whoever starts QEMU, which adopts it by name: `-netdev
  tap,ifname=tap...`); the VM gets its address by DHCP from the host's dnsmasq (agent/dhcp.py);
- a `netns` (a namespace standing for the VM): a veth whose VM side is created and addressed in it.
The host side is routed exactly like a pod's (proxy ARP, /32 route), so a VM gets connectivity and
policy like a container, and carries `VM_DHCP_SERVER` (scope host) for dnsmasq. Every VIF carries
the alias `tether-vm:<port id>`, which is how the agent recognises its own after a restart (and
adopts a tap made by someone else) and removes those whose port is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.calc.names import VM_DHCP_SERVER, confined_netns, own_link, require_own_link
from tether.dataplane.pods import AttachError, attach_pod, host_side_sysctls, write_sysctl
from tether.dataplane.rtnl_batch import RtnlSocket

ALIAS_PREFIX = "tether-vm:"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
RT_SCOPE_HOST = 254


def create_tap(name: str) -> None:
    """A persistent tap with no process attached (as `ip tuntap add NAME mode tap vnet_hdr`): QEMU
    or libvirt opens it by name later. Single queue: a hypervisor asking for a multi-queue tap must
    create it itself (the agent adopts it)."""
    require_own_link(name, "create tap")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def is_tap(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}/tun_flags")


def dhcp_address(ipr: IPRoute, index: int) -> None:
    """The DHCP server's address on a VM port's host side (scope host: never chosen as a source)."""
    try:
        ipr.addr("add", index=index, address=VM_DHCP_SERVER, prefixlen=32, scope=RT_SCOPE_HOST)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


@dataclass(frozen=True)
class VifSpec:
    port_id: str
    host_ifname: str
    netns: str | None  # where the VM side (a veth) goes; None: a real VM, whose host side is a tap
    ifname: str
    ips: tuple[str, ...]
    mac: str | None
    mtu: int


@dataclass
class VifReport:
    plugged: list[str]
    removed: list[str]
    waiting: list[str]  # veth ports whose VM namespace does not exist (yet)
    errors: list[str]


def reconcile_vifs(specs: list[VifSpec]) -> VifReport:
    """Plug the VIFs that should exist and are missing; remove ours that should not exist. Only
    links with Tether's names are touched, and only namespaces under the runtime's netns
    directories are entered (a port's netns comes from the API): anything else is an error."""
    report = VifReport([], [], [], [])
    wanted = {}
    for s in specs:
        if not own_link(s.host_ifname):
            report.errors.append(f"{s.host_ifname}: not a Tether device name (tap<port id>); not plugged")
        else:
            wanted[s.host_ifname] = s
    with IPRoute() as ipr, contextlib.closing(RtnlSocket()) as rt:
        links = {link.name: link for link in rt.links()}  # pyroute2 decodes a dump 17x slower
        for name, link in links.items():
            if link.alias.startswith(ALIAS_PREFIX) and name not in wanted and own_link(name):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link.index)
                report.removed.append(name)
        for name, spec in wanted.items():
            if name in links and spec.netns and is_tap(name):
                # a tap made before the port named its namespace: the VM side is a veth there now
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=links[name].index)
                report.removed.append(name)
                del links[name]
            if name in links:
                link = links[name]
                if link.alias != ALIAS_PREFIX + spec.port_id and not is_tap(name):
                    # only a hypervisor's tap is adopted: a link of another kind by that name is not ours
                    report.errors.append(f"{name}: exists and is not a tap Tether made or a VM's tap; not adopted")
                    continue
                try:
                    if link.mtu != spec.mtu or not link.flags & 1:
                        ipr.link("set", index=link.index, mtu=spec.mtu, state="up")
                    if link.alias != ALIAS_PREFIX + spec.port_id:  # made by the hypervisor: adopted
                        ipr.link("set", index=link.index, ifalias=ALIAS_PREFIX + spec.port_id)
                        write_sysctl(f"net/ipv4/conf/{name}/send_redirects", "0")
                        report.plugged.append(name)
                    host_side_sysctls(name)
                    dhcp_address(ipr, link.index)
                except (NetlinkError, OSError) as e:
                    report.errors.append(f"{name}: {e}")
                continue
            if not spec.netns:  # a real VM's tap, which QEMU or libvirt opens by name
                try:
                    create_tap(name)
                    idx = ipr.link_lookup(ifname=name)[0]
                    ipr.link("set", index=idx, mtu=spec.mtu, ifalias=ALIAS_PREFIX + spec.port_id)
                    host_side_sysctls(name)
                    write_sysctl(f"net/ipv4/conf/{name}/send_redirects", "0")
                    ipr.link("set", index=idx, state="up")
                    dhcp_address(ipr, idx)
                    report.plugged.append(name)
                except (NetlinkError, OSError) as e:
                    report.errors.append(f"{name}: cannot create its tap: {e}")
                continue
            try:
                path = confined_netns(spec.netns)
            except ValueError as e:
                report.errors.append(f"{name}: {e}; not plugged")
                continue
            if not os.path.exists(path):
                report.waiting.append(name)
                continue
            try:
                attach_pod(pod_netns=path, ifname=spec.ifname, host_ifname=name, ips=list(spec.ips),
                           mac=spec.mac, mtu=spec.mtu)
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=idx, ifalias=ALIAS_PREFIX + spec.port_id)
                # nested containers' traffic between each other comes back out of the same tap: no redirects
                write_sysctl(f"net/ipv4/conf/{name}/send_redirects", "0")
                dhcp_address(ipr, idx)
                report.plugged.append(name)
            except (AttachError, NetlinkError, OSError) as e:
                report.errors.append(f"{name}: {e}")
    return report
