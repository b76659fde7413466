"""The agent owns one nft table and one name prefix: it removes stale objects of its own, leaves
everything else alone, and writes nothing to the kernel before its first full sync."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, nsx, wait_for
from tether.lab.inspect import kernel_state
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


def test_stale_owned_objects_are_removed_and_foreign_ones_kept(fresh_lab: Lab) -> None:
    lab = fresh_lab
    net = unique("n")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.46.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "a", net)
    b = lab.run_pod("h2", "b", net)
    time.sleep(0.5)
    ns = lab.host("h1").ns
    good = kernel_state(ns, handles=False)  # a stale chain in our table makes the agent rebuild it
    lab.kill_agent("h1")
    # leftovers from a previous life (ours) and someone else's objects
    nsx(ns, "ip", "link", "add", "tthdeadbeef001", "type", "veth", "peer", "name", "tthdeadbeef002")
    nsx(ns, "ip", "route", "add", "10.46.200.0/26", "dev", "tth.vxlan", "proto", "201", "onlink", "via",
        "169.254.64.99")
    nsx(ns, "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    nsx(ns, "ip", "link", "set", "other0", "up")
    nsx(ns, "ip", "link", "set", "other1", "up")
    nsx(ns, "ip", "route", "add", "10.99.0.0/24", "dev", "other0")
    nsx(ns, "nft", "add", "chain", "inet", "tether", "ing-tthdeadbeef009",
        '{ type filter hook ingress device "tthdeadbeef009" priority -500 ; policy drop ; }')
    nsx(ns, "nft", "add", "element", "inet", "tether", "vxlan_peers", "{ 198.18.9.9 }")
    nsx(ns, "nft", "add", "table", "inet", "someone_else")
    lab.start_agent("h1")
    wait_for(lambda: kernel_state(ns, handles=False) == good, 10, "the agent to remove what it no longer wants")
    links = nsx(ns, "ip", "link", "show").stdout
    assert "other0" in links and "tthdeadbeef" not in links
    assert "10.99.0.0/24" in nsx(ns, "ip", "route").stdout
    assert "someone_else" in nsx(ns, "nft", "list", "tables").stdout
    assert lab.reaches("h1/a", b.ip)


def test_no_kernel_writes_before_the_first_full_sync(fresh_lab: Lab) -> None:
    lab = fresh_lab
    ns = lab.host("h3").ns
    lab.kill_agent("h3")
    lab.stop_server()
    # a fresh lab's h3 may not have written its table yet when it is killed (a busy machine)
    nsx(ns, "nft", "delete", "table", "inet", "tether", check=False)
    nsx(ns, "ip", "link", "del", "tth.vxlan", check=False)
    # the agent's saved replica would allow a plan, but the agent must wait for the server
    lab.start_agent("h3", wait=False)
    time.sleep(3)
    assert "tether" not in nsx(ns, "nft", "list", "tables").stdout
    assert lab.agent_status("h3") == 50, "STATUS must say the agent is not ready before its first sync"
    lab.start_server()
    lab.wait_agent("h3")
    wait_for(lambda: "tether" in nsx(ns, "nft", "list", "tables").stdout, 10, "the table after the first sync")


def test_the_periodic_reconcile_puts_back_what_was_changed_by_hand_and_leaves_other_tables(fresh_lab: Lab) -> None:
    """The reconcile lists the nft table only when nftables' generation shows a commit not the
    agent's (dataplane.nft.NftDataplane.verify): an element deleted by hand is such a commit."""
    lab = fresh_lab
    lab.kill_agent("h1")
    lab.state.agent_args = [*lab.state.agent_args, "--reconcile-interval", "1"]
    lab.start_agent("h1")
    net = unique("n")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.47.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "a", net)
    b = lab.run_pod("h2", "b", net)
    ns = lab.host("h1").ns
    peer = lab.host("h2").ip
    wait_for(lambda: peer in nsx(ns, "nft", "list", "set", "inet", "tether", "vxlan_peers").stdout, 10,
             "h2 in h1's vxlan_peers")
    time.sleep(1)  # the applies of the pods' arrival done
    good = kernel_state(ns, handles=False)
    nsx(ns, "nft", "add", "table", "inet", "someone_else")
    nsx(ns, "nft", "delete", "element", "inet", "tether", "vxlan_peers", "{", peer, "}")
    # the wait is 1 s, or 100 x what the last pass took when that is longer
    wait_for(lambda: kernel_state(ns, handles=False) == good, 60, "the reconcile to put the element back")
    assert "someone_else" in nsx(ns, "nft", "list", "tables").stdout
    assert lab.reaches("h1/a", b.ip)
