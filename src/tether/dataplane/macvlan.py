"""A nested container's interface: a macvlan child of the VM's interface (Kuryr's nested mode).

The child is created in the VM's namespace on top of its interface and moved straight into the
container's namespace. It is routed like a pod: its address as /32, the link-local gateway
169.254.1.1 pinned to the same host-side MAC the VM uses, and a default route through it, so all of
its traffic, even to a sibling in the same VM, leaves through the VM's tap and meets the host's
policy. This kernel has no 802.1Q VLAN device, so VLAN-trunk subports are not an option here.
"""

from __future__ import annotations

import ipaddress
import os
import secrets

from tether.calc.names import POD_GATEWAY, confined_netns
from tether.dataplane.netns import ipr_in
from tether.dataplane.pods import AttachError
from tether.dataplane.rtnl_batch import NUD_PERMANENT, RT_SCOPE_LINK


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/var/run/netns/{netns}"


def _vm_netns(vm_netns: str) -> str:
    """The VM's namespace (from its port, i.e. the API): only under the runtime's netns directories."""
    try:
        return confined_netns(vm_netns)
    except ValueError as e:
        raise AttachError(str(e)) from None


def gateway_mac(vm_netns: str, parent_if: str) -> str:
    """The host-side MAC the VM reaches its gateway through (set by the agent when it plugged the VM)."""
    with ipr_in(_vm_netns(vm_netns)) as vm:
        idx = vm.link_lookup(ifname=parent_if)
        if not idx:
            raise AttachError(f"the VM has no interface {parent_if}: is its port plugged?")
        for n in vm.get_neighbours(ifindex=idx[0]):
            if n.get("NDA_DST") == POD_GATEWAY and n.get("NDA_LLADDR"):
                return n.get("NDA_LLADDR")
    raise AttachError(f"the VM's {parent_if} has no neighbour entry for {POD_GATEWAY}: is its port plugged?")


def plug_macvlan(*, vm_netns: str, parent_if: str, netns: str, ifname: str, ips: list[str], mac: str) -> None:
    gw_mac = gateway_mac(vm_netns, parent_if)
    tmp = "nv" + secrets.token_hex(5)
    fd = os.open(_netns_path(netns), os.O_RDONLY)
    try:
        with ipr_in(_vm_netns(vm_netns)) as vm:
            parent = vm.link_lookup(ifname=parent_if)[0]
            vm.link("add", ifname=tmp, kind="macvlan", link=parent, macvlan_mode="bridge", address=mac, net_ns_fd=fd)
    finally:
        os.close(fd)
    with ipr_in(_netns_path(netns)) as c:
        idx = c.link_lookup(ifname=tmp)[0]
        c.link("set", index=idx, ifname=ifname)
        lo = c.link_lookup(ifname="lo")
        if lo:
            c.link("set", index=lo[0], state="up")
        for ip in ips:
            c.addr("add", index=idx, address=ip, prefixlen=32 if ipaddress.ip_address(ip).version == 4 else 128)
        c.link("set", index=idx, state="up")
        c.route("add", dst=f"{POD_GATEWAY}/32", oif=idx, scope=RT_SCOPE_LINK)
        c.neigh("replace", dst=POD_GATEWAY, lladdr=gw_mac, ifindex=idx, state=NUD_PERMANENT)
        c.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=idx)
