"""The host-local address the agent's DNS answers on: a /32 on a dummy device of our own, or on
the loopback device when the kernel has no dummy driver (as on the lab machines).

A dummy device (not a pod veth, so outside the `tth` prefix that links.py garbage-collects) keeps
the address up whatever happens to other interfaces. Either way it is idempotent: a restarted agent
finds the address in place and changes nothing.
"""

from __future__ import annotations

import errno

from pyroute2.netlink.exceptions import NetlinkError

from tether.dataplane.netns import open_ipr

DEVICE = "tether-dns"


def ensure_address(ip: str, device: str = DEVICE, netns: str | None = None) -> str:
    """Make `ip`/32 a local address (on `device`, else on lo); returns the device that holds it."""
    with open_ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            try:
                ipr.link("add", ifname=device, kind="dummy")
                found = ipr.link_lookup(ifname=device)
            except NetlinkError as e:
                if e.code not in (errno.EOPNOTSUPP, errno.ENOENT):
                    raise
                device, found = "lo", ipr.link_lookup(ifname="lo")
        idx = found[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
        if ip not in have:
            ipr.addr("add", index=idx, address=ip, prefixlen=32)
        if not ipr.get_links(idx)[0]["flags"] & 1:  # IFF_UP
            ipr.link("set", index=idx, state="up")
    return device
