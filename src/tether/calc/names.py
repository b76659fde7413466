"""The names and addresses the kernel sees, derived from ids: one place, shared by server and agent.

Pure: imports nothing from the agent or the server. The server derives an endpoint's host-side
device name from its owner with these functions and refuses any other, so no API client can make
an agent configure, hook or delete a device that is not Tether's (issue 22). The agent and its CNI,
Docker and VM-port paths name their devices with the same functions, so both sides always agree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

LINK_PREFIX = "tth"  # every link Tether owns starts with it (pod veths, the VTEP), or is a VM port's tap
VIF_PREFIX = "tap"  # os-vif names a VM port's host side "tap" + the first 11 characters of the port id
IFNAMSIZ = 16  # the kernel's limit including the NUL: at most 15 characters
NETNS_DIRS = ("/run/netns", "/var/run/netns")  # where `ip netns` and the container runtimes put them
IFNAME = re.compile(r"^[A-Za-z0-9_.@+=-]{1,15}$")  # printable, no '/', ':' or whitespace (dev_valid_name)
NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")

VTEP_NAME = "tth.vxlan"
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
VXLAN_OVERHEAD6 = 70  # the same over an IPv6 underlay: its header is 40 bytes


def vxlan_overhead(underlay_ip: str) -> int:
    """What VXLAN adds to a packet on this underlay address's family (the VTEP's MTU is the
    underlay's minus this)."""
    return VXLAN_OVERHEAD6 if ":" in underlay_ip else VXLAN_OVERHEAD


RTPROT_TETHER = 201  # routes we install carry this protocol number
NFT_TABLE = "tether"  # family inet
POD_GATEWAY = "169.254.1.1"  # the link-local gateway every pod routes through (host side answers ARP)
POD_GATEWAY6 = "fe80::1"
# the host side of every VM port's tap carries this address (scope host, so the kernel never picks it
# as a source): dnsmasq serves DHCP only on an interface with an address, and VMs see it as their
# DHCP server (option 54). Link-local: never routed, the same on every host.
VM_DHCP_SERVER = "169.254.1.2"
DHCP_RUN_DIR = "/run/tether-dhcp"  # one directory per agent (`dhcp_dir`): dnsmasq's files, world-readable
# Mark bits. meta mark (per packet): NP_OK / SG_OK say a NetworkPolicy / security-group rule allowed
# the packet; services use the low bits as a backend slot. ct mark (per connection): HAIRPIN_MARK =
# source-NAT it (published ports, hairpin); CT_REJUDGE = judge it again (a policy changed, see
# dataplane/conntrack.py); CT_DENIED = a judgement denied it; CT_PICKED = picked up mid-stream.
NP_OK = 0x100000
SG_OK = 0x200000
HAIRPIN_MARK = 0x4000
CT_REJUDGE = 0x10000
CT_DENIED = 0x20000
CT_PICKED = 0x40000
LOG_GROUP = 7  # NFLOG group of denied packets (read by tether.agent.flowlog)
# the links this agent may create, change, hook or delete: its prefix, at most 15 characters (IFNAMSIZ),
# nothing a path or an nft string could be bent with; and VM ports' taps (a port id's first 11 characters)
_OWN_LINK = re.compile(rf"^({LINK_PREFIX}[0-9A-Za-z._-]{{1,12}}|{VIF_PREFIX}[0-9a-f]{{8}}-[0-9a-f]{{2}})$")


class ForeignLink(ValueError):
    """A device the agent does not own was about to be created, changed, hooked or deleted."""


def own_link(name: str | None) -> bool:
    """Whether the agent owns the link `name` (Tether's prefix, or a VM port's tap): the only links
    it ever touches, whatever its replica holds (an endpoint's `interface` comes from the API)."""
    return bool(name) and _OWN_LINK.match(name) is not None  # type: ignore[arg-type]


def require_own_link(name: str | None, action: str) -> str:
    """`name`, or ForeignLink naming it and the action refused."""
    if not own_link(name):
        raise ForeignLink(f"refusing to {action} link {name!r}: it is not Tether's (names start with "
                          f"{LINK_PREFIX!r} or are a VM port's {VIF_PREFIX}<port id>)")
    return name  # type: ignore[return-value]


def confined_netns(path: str | None) -> str:
    """The real path of a network namespace named by the API (a VM port's netns: a name, or a path
    under /run/netns or /var/run/netns), or ValueError: /proc/<pid>/ns/net, '..' and symlinks out
    of those directories would let a client put an interface into any namespace. (The CNI_NETNS a
    local runtime gives over the root-only CNI socket is trusted and does not come here.)"""
    if not path or "\0" in path:
        raise ValueError(f"network namespace {path!r} is empty or malformed")
    full = path if "/" in path else f"/var/run/netns/{path}"
    if ".." in full.split("/"):
        raise ValueError(f"network namespace {path!r} contains '..'; give a name under /run/netns")
    outside = ValueError(f"network namespace {path!r} is outside {' and '.join(NETNS_DIRS)}; "
                         "name a namespace made by `ip netns add` (or the runtime) there")
    if os.path.dirname(full.rstrip("/")) not in NETNS_DIRS:
        raise outside
    try:
        real = os.path.realpath(full)  # a symlink in there may point anywhere
        dirs = {os.path.realpath(d) for d in NETNS_DIRS}
    except OSError:
        raise outside from None
    if os.path.dirname(real) not in dirs:
        raise outside
    return real


def digest(text: str, n: int = 12) -> str:
    """A short, stable hex digest: how Tether derives a valid kernel or nft name from any text."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def id12(obj_id: str) -> str:
    """An object id's first 12 characters without dashes (chain and set names of policies, groups)."""
    return obj_id.replace("-", "")[:12]


def stateless_chain(network: str) -> str:
    """The base table's stateless chain for one network (calc.base_nft), named by a digest so that
    any network name gives a short, valid chain name."""
    return "st-" + digest(network)


def host_ifname(container_id: str, ifname: str) -> str:
    """Host-side veth name for a pod interface: our prefix + 11 hex characters (15 in all)."""
    return LINK_PREFIX + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def vif_name(port_id: str) -> str:
    """The host-side device name os-vif (and Nova's libvirt driver) gives a VM port's tap:
    `tap` + the port id's first 11 characters, e.g. tap11111111-22."""
    return VIF_PREFIX + port_id[:11]


def dhcp_dir(host: str, state_dir: str) -> str:
    """Where an agent keeps its dnsmasq's files: under /run (dnsmasq re-reads them on SIGHUP after
    dropping root, so they cannot sit in a private state directory), one per agent (its host name
    and state directory: several lab agents share one machine)."""
    return os.path.join(DHCP_RUN_DIR, f"{dns_label(host, 'host')[:40]}-{digest(state_dir, 8)}")


DOCKER_PEER_PREFIX = "tdk"  # the container end until dockerd renames it; not LINK_PREFIX, so no apply removes it
DOCKER_PEER = re.compile(rf"^{DOCKER_PEER_PREFIX}[0-9a-f]{{1,12}}$")


def docker_peer_name(docker_endpoint_id: str) -> str:
    """The container side of a Docker endpoint's veth until dockerd moves and renames it."""
    return DOCKER_PEER_PREFIX + docker_endpoint_id[:12]


def docker_ifname(endpoint_id: str) -> str:
    """Host-side veth name of a Docker endpoint (known before the container exists)."""
    return host_ifname(endpoint_id, "docker")


def _mac(seed: str, base: str = "02", n: int = 5) -> str:
    h = hashlib.sha1(seed.encode()).digest()  # not sha1_hex: the bytes, 3 or 5 of them
    return base + ":" + ":".join(f"{b:02x}" for b in h[:n])


def vtep_mac_for(host_name: str) -> str:
    """A stable, locally administered MAC for the host's VTEP (same after every restart)."""
    return _mac(f"tether-vtep:{host_name}")


def pod_mac(container_id: str, ifname: str) -> str:
    """A stable, locally administered unicast MAC for a pod interface that asked for none."""
    return _mac(f"tether-pod:{container_id}/{ifname}")


def docker_endpoint_mac(endpoint_id: str) -> str:
    """A stable, locally administered MAC, known before the veth exists (anti-spoofing pins it)."""
    return _mac(f"tether-docker:{endpoint_id}")


def neutron_mac(ep_id: str) -> str:
    """A stable MAC in OpenStack's base fa:16:3e for endpoints created without one."""
    return _mac(ep_id, "fa:16:3e", 3)


# --- object names made from runtime ids ----------------------------------------------------------------

NOT_LABEL = re.compile(r"[^a-z0-9-]+")
HEX_ID = re.compile(r"[0-9a-f]{32,}")  # the container ids that Docker, containerd and CRI-O make


def sha1_hex(text: str, n: int) -> str:
    """The first n hex digits of text's SHA-1: the short digests in pod, port and service names."""
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def dns_label(text: str, fallback: str) -> str:
    """`text` made a DNS label (lower case, '-' for anything else, at most 63), or `fallback`."""
    label = NOT_LABEL.sub("-", text.lower()).strip("-")[:63].strip("-")
    return label or fallback


def pod_name(container_id: str) -> str:
    """The name of a pod whose runtime passed no K8S_POD_NAME: for the hex IDs that runtimes make,
    "c-" and the short form `docker ps` shows; for other IDs (cnitool, Mesos and scripts pass IDs
    such as "web-1" and "web-12" that share prefixes) the whole ID, so that two pods' names do
    not collide and cost the ADD a second round trip to the server."""
    cid = container_id.lower()
    if HEX_ID.fullmatch(cid):
        return f"c-{cid[:12]}"
    name = dns_label(f"c-{cid}", "c")
    if name != f"c-{cid}":  # cut to 63 or changed: a digest of the ID keeps it apart from the rest
        name = f"{name[:52].strip('-')}-{sha1_hex(container_id, 8)}"
    return name


def disambiguated(name: str, handle: str) -> str:
    """A second name for an endpoint whose name is taken (same pod name, or container ids sharing a
    prefix): the name and a digest of its whole runtime handle."""
    return dns_label(f"{name[:50]}-{sha1_hex(handle, 8)}", name)


def host_port_name(handle: str) -> str:
    """The service that publishes a CNI container's hostPorts (one per container interface)."""
    return "cni-" + sha1_hex(handle, 12)


def random_neutron_mac() -> str:
    """A random MAC in OpenStack's default base fa:16:3e (a Neutron port created without one, a
    nested container's macvlan)."""
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def endpoint_interface(owner_type: str, ep_id: str, container_id: str | None, ifname: str | None) -> str | None:
    """The host-side device an endpoint's owner gets, as the agent names it; None: no device of its own
    (an API-owned endpoint, or a nested container living behind its VM's interface)."""
    if owner_type == "cni":
        return host_ifname(container_id, ifname) if container_id and ifname else None
    if owner_type == "docker":
        return docker_ifname(ep_id)
    if owner_type == "vm":
        return vif_name(ep_id)
    return None


def endpoint_mac(owner_type: str, ep_id: str, container_id: str | None, ifname: str | None) -> str | None:
    """The MAC an endpoint gets when its runtime gave none: the one its plugging path would pick."""
    if owner_type == "cni":
        return pod_mac(container_id, ifname) if container_id and ifname else None
    if owner_type == "docker":
        return docker_endpoint_mac(ep_id)
    if owner_type == "vm":
        return neutron_mac(ep_id)
    return None


def ifname_problem(name: str) -> str | None:
    """Why the kernel (or Tether's rule of thumb) would refuse this interface name; None if fine."""
    if not name:
        return "is empty"
    if len(name) >= IFNAMSIZ:
        return f"has {len(name)} characters; Linux interface names have at most {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "is '.' or '..'"
    if not IFNAME.match(name):
        return "may only hold letters, digits and '_.@+=-' (no '/', ':' or whitespace)"
    return None


def netns_problem(netns: str) -> str | None:
    """Why a network namespace reference is outside the runtime's netns directories; None if fine.

    A bare name means /var/run/netns/<name> (as `ip netns` does); a path must name an entry directly
    in /run/netns or /var/run/netns (never /proc, never '..', never a subdirectory)."""
    if "/" not in netns:
        if netns in (".", "..") or not NETNS_NAME.match(netns):
            return "is not a valid network namespace name (letters, digits, '_', '.', '-')"
        return None
    for d in NETNS_DIRS:
        if netns.startswith(d + "/"):
            rest = netns[len(d) + 1:]
            if rest and "/" not in rest and rest not in (".", "..") and NETNS_NAME.match(rest) \
                    and os.path.normpath(netns) == netns:
                return None
    return f"must be a namespace name or a path directly under {' or '.join(NETNS_DIRS)} (e.g. /run/netns/vm1)"


# --- nft chain and set names -------------------------------------------------------------------------
# Every chain and set of the `inet tether` table that is named after an object is named here.


def _v(version: int) -> str:
    return "" if version == 4 else "6"


def policy_chain(direction: str, policy_id: str) -> str:
    """`npi-`/`npe-<id12>`: one NetworkPolicy's rules for one direction."""
    return f"np{'i' if direction == 'Ingress' else 'e'}-{id12(policy_id)}"


def group_chain(direction: str, group_id: str) -> str:
    """`sgi-`/`sge-<id12>`: one security group's rules for one direction."""
    return f"sg{'i' if direction == 'Ingress' else 'e'}-{id12(group_id)}"


def group_members_set(version: int, group_id: str) -> str:
    """`sgm-`/`sgm6-<id12>`: the addresses of a remote group's members."""
    return f"sgm{_v(version)}-{id12(group_id)}"


def selector_set(version: int, selector_key: str) -> str:
    """`sel-`/`sel6-<digest>`: the addresses a policy peer's selectors choose (by their JSON)."""
    return f"sel{_v(version)}-{digest(selector_key)}"


def named_port_set(direction: str, port_name: str) -> str:
    """`pn-in-`/`pn-out-<port name>`: who declares a named port."""
    return f"pn-{'in' if direction == 'Ingress' else 'out'}-{port_name}"


def others_set(version: int, network: str) -> str:
    """`others-`/`others6-<network>`: the subnets of every other network (isolation)."""
    return f"others{_v(version)}-{network}"


@functools.lru_cache(maxsize=1 << 15)
def dispatch_chain(d: str, network: str, policy_ids: tuple[str, ...], group_ids: tuple[str, ...]) -> str:
    """`in-`/`out-<digest>` of a dispatch chain: endpoints with the same layers share it."""
    return f"{d}-{digest(json.dumps([d, network, list(policy_ids), list(group_ids)]))}"


def ingress_chain(interface: str) -> str:
    """`ing-<interface>`: a pod interface's own ingress chain."""
    return "ing-" + interface


def lb_chain(n: int, affinity: int | None, version: int = 4) -> str:
    """`svc-lb-<n>` (`svc6-...`): balance over n backend slots; `svc-aff-<timeout>-<n>` with client affinity."""
    return f"svc{_v(version)}-lb-{n}" if affinity is None else f"svc{_v(version)}-aff-{affinity}-{n}"


def published_chain(target: str) -> str:
    """`svc-np-...`: the published-port entry to a balancing chain."""
    return f"svc-np-{target.removeprefix('svc-')}"


def published6_chain(n: int, affinity: int | None, keep_source: bool) -> str:
    """`svc6-np-lb-<n>` (`svc6-np-aff-<timeout>-<n>`, `...-local` keeping the client's address): an
    IPv6 published port balanced over n slots (its own chain: the DNAT key has no node address)."""
    base = f"svc6-np-lb-{n}" if affinity is None else f"svc6-np-aff-{affinity}-{n}"
    return base + ("-local" if keep_source else "")
