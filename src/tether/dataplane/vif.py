"""VM interfaces (VIFs): a veth named as os-vif names a tap, `tap<first 11 chars of the port id>`.

The host side is routed exactly like a pod's (proxy ARP, /32 route, link-local gateway), so a VM
gets addressing, connectivity and policy like a container. The VM side is created directly in the
namespace that stands for the VM (the port's `binding:profile` `netns`), where a hypervisor would
attach the tap to the guest. Every VIF carries the alias `tether-vm:<port id>`, which is how the
agent recognises its own after a restart and removes those whose port is gone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.calc.names import confined_netns, own_link
from tether.dataplane.pods import AttachError, attach_pod, host_side_sysctls, write_sysctl
from tether.dataplane.rtnl_batch import RtnlSocket

ALIAS_PREFIX = "tether-vm:"


@dataclass(frozen=True)
class VifSpec:
    port_id: str
    host_ifname: str
    netns: str | None  # where the VM side goes; None: not known yet (nothing is plugged)
    ifname: str
    ips: tuple[str, ...]
    mac: str | None
    mtu: int


@dataclass
class VifReport:
    plugged: list[str]
    removed: list[str]
    waiting: list[str]  # ports whose VM namespace does not exist (yet)
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
            if name in links:
                link = links[name]
                if link.mtu != spec.mtu or not link.flags & 1:
                    with contextlib.suppress(NetlinkError):
                        ipr.link("set", index=link.index, mtu=spec.mtu, state="up")
                host_side_sysctls(name)
                continue
            if not spec.netns:
                report.waiting.append(name)
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
                report.plugged.append(name)
            except (AttachError, NetlinkError, OSError) as e:
                report.errors.append(f"{name}: {e}")
    return report
