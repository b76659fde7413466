"""The agent touches only its own links and only enters the runtime's namespaces, whatever its
replica says (issue 22): checked against the kernel in throwaway namespaces. Every call that could
touch a device runs on a thread inside the scratch namespace (its /proc/sys/net too), so even a
regression could only hit the scratch namespace's own `eth0`."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tether.calc.host import HostContext, compute_plan
from tether.calc.names import ForeignLink, confined_netns
from tether.calc.plan import HostInterface, NftChain, NftPlan, Plan, Route
from tether.calc.replica import Replica
from tether.dataplane.links import Applied, apply_links
from tether.dataplane.netns import _setns
from tether.dataplane.nft import NftDataplane
from tether.dataplane.pods import AttachError, host_side_sysctls, plug_link
from tether.dataplane.tracker import DeltaTracker
from tether.dataplane.vif import VifSpec, reconcile_vifs
from tether.model import Endpoint, Host, Network, Owner, Subnet

pytestmark = pytest.mark.root  # network namespaces


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, timeout=30, capture_output=True, text=True).stdout


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """fn() on a thread that has entered `ns` (sockets, and /proc/sys/net opened there, are ns's)."""
    out: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(fd)  # this thread only, and it ends with the call
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def eth0_state(ns: str) -> tuple:
    """eth0's MTU, state, addresses, its sysctls and any routes or ingress chain on it."""
    link = json.loads(ip(ns, "-j", "-d", "link", "show", "eth0"))[0]
    sysctls = in_netns(ns, lambda: tuple(open(f"/proc/sys/net/ipv4/conf/eth0/{k}").read().strip()
                                         for k in ("proxy_arp", "rp_filter")))
    routes = ip(ns, "route", "show", "dev", "eth0")
    return link["mtu"], link["operstate"], link["flags"], sysctls, routes


@pytest.fixture
def scratch(netns: Callable[[], str]) -> str:
    ns = netns()
    ip(ns, "link", "set", "lo", "up")
    # stands for the host's own device (no dummy driver here: a veth)
    ip(ns, "link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", "eth0p")
    ip(ns, "link", "set", "eth0p", "up")
    ip(ns, "link", "set", "eth0", "up")
    ip(ns, "addr", "add", "198.18.0.1/24", "dev", "eth0")
    in_netns(ns, lambda: [open(f"/proc/sys/net/ipv4/conf/eth0/{k}", "w").write(v)
                          for k, v in (("proxy_arp", "0"), ("rp_filter", "2"))])
    return ns


def poisoned_replica() -> Replica:
    r = Replica()
    r.objects["Host"]["h1"] = Host(name="h1", underlay_ip="198.18.0.1", underlay_cidr="198.18.0.0/24",
                                   vtep_ip="169.254.64.1")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.41.0.0/16")], encap="vxlan")
    ep = Endpoint(id="bad", name="bad", network="n", host="h1", ips=["10.41.0.9"], interface="eth0",
                  owner=Owner(type="api"))
    r.objects["Endpoint"][ep.id] = ep
    return r


def test_an_endpoint_naming_eth0_leaves_eth0_untouched_on_full_and_delta_passes(scratch: str) -> None:
    ns = scratch
    before = eth0_state(ns)
    plan = compute_plan(poisoned_replica(), HostContext("h1", "eth0", 1500))
    assert [q.kind for q in plan.quarantined] == ["Endpoint"]
    # the dataplane refuses it on its own too: a plan that names eth0 anyway (defence in depth)
    forged = Plan(interfaces=frozenset({HostInterface("eth0", 1450, "bad", "", ("10.41.0.9",))}),
                  routes=frozenset({Route("10.41.0.9/32", "eth0", scope="link")}), underlay_dev="eth0",
                  nft=NftPlan(chains=(NftChain("ing-eth0", (), hook="ingress", type="filter", priority=-500,
                                               policy="drop", device="eth0"),)))
    for p in (plan, forged):
        report, applied = in_netns(ns, lambda p=p: apply_links(p))  # full pass
        assert "eth0" not in applied.interfaces
        report, applied = in_netns(ns, lambda p=p, a=applied: apply_links(p, applied=a))  # delta pass
        assert "eth0" not in applied.interfaces
        assert eth0_state(ns) == before
    assert any("eth0" in f for f in report.failures)
    nft = NftDataplane(ns)
    nrep = nft.apply(forged.nft)
    assert nrep.failures and "eth0" not in subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                                                          capture_output=True, text=True, timeout=30).stdout
    # the endpoint is deleted: the delta pass must not delete eth0 even if it had been applied before
    was = Applied(interfaces=DeltaTracker({"eth0": (1450, "bad")}),
                  routes=DeltaTracker(dict.fromkeys([Route("10.41.0.9/32", "eth0", scope="link")])))
    in_netns(ns, lambda: apply_links(Plan(underlay_dev="eth0"), applied=was))
    assert eth0_state(ns) == before


def test_a_vm_port_whose_netns_is_proc_1_is_not_plugged(scratch: str) -> None:
    ns = scratch
    link = f"/run/netns/{ns}-out"
    os.symlink("/proc/1/ns/net", link)  # a symlink out of the netns directory: refused like the path itself
    try:
        specs = [VifSpec("01234567-89ab", "tap01234567-89", "/proc/1/ns/net", "tvmp0", ("10.41.0.7",), None, 1450),
                 VifSpec("01234567-89cd", "tap01234567-8a", link, "tvmp1", ("10.41.0.8",), None, 1450),
                 VifSpec("01234567-89ef", "tap01234567-8b", f"{ns}/../../proc/1/ns/net", "tvmp2", (), None, 1450)]
        report = in_netns(ns, lambda: reconcile_vifs(specs))
    finally:
        os.unlink(link)
    assert not report.plugged and len(report.errors) == 3 and all("outside" in e or ".." in e for e in report.errors)
    assert "tap01234567" not in ip(ns, "link", "show")


def test_a_link_named_like_a_vm_ports_tap_that_is_not_a_tap_is_not_adopted(scratch: str) -> None:
    """Only a hypervisor's tap is adopted (alias, DHCP address, removal with its port): a veth that
    happens to have the name stays as it was."""
    ns = scratch
    ip(ns, "link", "add", "tap01234567-89", "type", "veth", "peer", "name", "tvmpeer0")
    specs = [VifSpec("01234567-89ab", "tap01234567-89", None, "eth0", ("10.41.0.7",), None, 1450)]
    report = in_netns(ns, lambda: reconcile_vifs(specs))
    assert not report.plugged and len(report.errors) == 1 and "not a tap" in report.errors[0], report
    shown = ip(ns, "-d", "addr", "show", "dev", "tap01234567-89")
    assert "tether-vm:" not in shown and "169.254.1.2" not in shown and "mtu 1450" not in shown, shown


def test_netns_paths_from_the_api_are_confined_to_the_runtime_directories(scratch: str) -> None:
    assert confined_netns(scratch) == os.path.realpath(f"/var/run/netns/{scratch}")
    assert confined_netns(f"/run/netns/{scratch}") == os.path.realpath(f"/run/netns/{scratch}")
    for bad in ("/proc/1/ns/net", "/proc/self/ns/net", f"/run/netns/../netns/{scratch}", "/etc/passwd", "", "a\0b"):
        with pytest.raises(ValueError):
            confined_netns(bad)


def test_eexist_on_a_foreign_named_link_fails_the_request_and_deletes_nothing(scratch: str,
                                                                              netns: Callable[[], str]) -> None:
    ns, pod = scratch, netns()
    with pytest.raises(AttachError, match="not Tether's"):
        in_netns(ns, lambda: plug_link(pod_netns=f"/var/run/netns/{pod}", ifname="eth1", host_ifname="eth0",
                                       mac=None, mtu=1450))
    assert "eth0" in ip(ns, "link", "show", "eth0")
    assert "eth1" not in ip(pod, "link", "show")


def test_eexist_on_a_leftover_of_our_own_is_replaced(scratch: str, netns: Callable[[], str]) -> None:
    ns, pod = scratch, netns()
    ip(ns, "link", "add", "tthleft0", "type", "veth", "peer", "name", "tpleft0")
    link = in_netns(ns, lambda: plug_link(pod_netns=f"/var/run/netns/{pod}", ifname="eth1", host_ifname="tthleft0",
                                          mac=None, mtu=1450))
    link.close()
    assert "tpleft0" not in ip(ns, "link", "show")  # the leftover went, a new veth has its name
    assert "eth1" in ip(pod, "link", "show")


def test_sysctls_are_only_written_for_our_own_links() -> None:
    for name in ("eth0", "../../../../kernel/x", "all", "default"):
        with pytest.raises(ForeignLink):
            host_side_sysctls(name)
