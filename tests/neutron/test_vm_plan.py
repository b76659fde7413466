"""Pure parts of VM ports and nested containers: which VIFs a host plugs, and where nested addresses route."""

from __future__ import annotations

from tether.agent.vmports import wanted_vifs
from tether.calc.host import HostContext, compute_plan
from tether.calc.plan import Route
from tether.calc.replica import Replica
from tether.model import Endpoint, Host, Network, Owner, Subnet
from tether.server.neutron import vif_name


def replica() -> Replica:
    r = Replica()
    for i in (1, 2):
        r.objects["Host"][f"h{i}"] = Host(name=f"h{i}", underlay_ip=f"198.18.0.{i}", vtep_ip=f"169.254.64.{i}")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/24")], encap="direct")
    vm = Endpoint(id="11111111-2222-3333-4444-555555555555", name="vm", network="n", host="h1", ips=["10.1.0.10"],
                  mac="fa:16:3e:00:00:01", interface=vif_name("11111111-2222-3333-4444-555555555555"),
                  owner=Owner(type="vm", netns="/var/run/netns/vm"))
    child = Endpoint(id="c1", name="c1", network="n", host="h1", ips=["10.1.0.11"], parent=vm.id,
                     owner=Owner(type="nested"))
    other_vm = Endpoint(id="22222222-3333-4444-5555-666666666666", name="vm2", network="n", host="h2",
                        ips=["10.1.0.20"], interface=vif_name("22222222-3333-4444-5555-666666666666"),
                        owner=Owner(type="vm"))
    pod = Endpoint(id="p", name="p", network="n", host="h1", ips=["10.1.0.30"], interface="tthpod",
                   owner=Owner(type="cni"))
    for ep in (vm, child, other_vm, pod):
        r.objects["Endpoint"][ep.id] = ep
    return r


def test_vif_is_named_as_os_vif_names_a_tap() -> None:
    assert vif_name("11111111-2222-3333-4444-555555555555") == "tap11111111-22"


def test_host_plugs_only_vm_ports_bound_to_it() -> None:
    specs = wanted_vifs(replica(), "h1", 1500)
    assert [(s.host_ifname, s.netns, s.ips, s.mac, s.mtu) for s in specs] == [
        ("tap11111111-22", "/var/run/netns/vm", ("10.1.0.10",), "fa:16:3e:00:00:01", 1500)]
    assert [s.host_ifname for s in wanted_vifs(replica(), "h2", 1500)] == ["tap22222222-33"]


def test_vm_and_nested_addresses_route_through_the_vms_tap() -> None:
    plan = compute_plan(replica(), HostContext("h1", "eth0", 1500))
    assert Route("10.1.0.10/32", "tap11111111-22", scope="link") in plan.routes
    assert Route("10.1.0.11/32", "tap11111111-22", scope="link") in plan.routes
    assert Route("10.1.0.20/32", "eth0", via="198.18.0.2") in plan.routes  # unbound-block address on h2
    ing = plan.nft.chain("ing-tap11111111-22")  # the tap may send from its child's address too
    assert ing is not None and ing.device == "tap11111111-22" and '"10.1.0.11"' in "\n".join(ing.rules)
    r = replica()
    r.objects["Endpoint"]["p"] = r.objects["Endpoint"]["p"].model_copy(update={"security_groups": ["g"]})
    ep_in = compute_plan(r, HostContext("h1", "eth0", 1500)).nft.set("ep_in")
    assert ep_in is not None and "tap11111111-22" in {k for k, _ in ep_in.elements}
