"""What a host's dnsmasq serves its VM ports (calc/dhcp.py), and the nft rules that let DHCP through."""

from __future__ import annotations

from tether.calc.dhcp import dnsmasq_config
from tether.calc.host import HostContext, compute_plan
from tether.calc.names import vif_name, vxlan_overhead
from tether.calc.replica import Replica
from tether.model import Endpoint, Host, HostRoute, Network, Owner, SecurityGroup, Subnet

PORT = "11111111-2222-3333-4444-555555555555"
TAP = vif_name(PORT)


def replica(**subnet) -> Replica:
    r = Replica()
    for i in (1, 2):
        r.objects["Host"][f"h{i}"] = Host(name=f"h{i}", underlay_ip=f"198.18.0.{i}", vtep_ip=f"169.254.64.{i}")
    sub = Subnet(id="s1", cidr="10.1.0.0/24", gateway="10.1.0.1", **subnet)
    r.objects["Network"]["n"] = Network(name="n", subnets=[sub, Subnet(id="s6", cidr="fd00:1::/64")])
    eps = [
        Endpoint(id=PORT, name="vm", network="n", host="h1", ips=["fd00:1::5", "10.1.0.10"], mac="FA:16:3E:00:00:01",
                 interface=TAP, owner=Owner(type="vm")),
        Endpoint(id="22222222-3333-4444-5555-666666666666", name="vm2", network="n", host="h2", ips=["10.1.0.20"],
                 mac="fa:16:3e:00:00:02", interface=vif_name("22222222-3333-4444-5555-666666666666"),
                 owner=Owner(type="vm")),
        Endpoint(id="p", name="p", network="n", host="h1", ips=["10.1.0.30"], mac="02:00:00:00:00:01",
                 interface="tthpod", owner=Owner(type="cni")),
    ]
    for ep in eps:
        r.objects["Endpoint"][ep.id] = ep
    return r


def test_a_vm_port_is_served_by_mac_on_its_own_tap_and_pods_and_other_hosts_ports_are_not() -> None:
    cfg = dnsmasq_config(replica(), "h1", 1500, "169.254.20.10")
    assert cfg.hosts == f"fa:16:3e:00:00:01,tag:{TAP},10.1.0.10,vm,86400\n"
    assert cfg.args == ("--dhcp-range=set:sub-s1,10.1.0.0,static,255.255.255.0,86400",
                        "--shared-network=169.254.1.2,10.1.0.0")


def test_subnet_options_give_gateway_the_agents_dns_mtu_and_domain() -> None:
    opts = dnsmasq_config(replica(), "h1", 1500, "169.254.20.10").opts.splitlines()
    assert opts == ["tag:sub-s1,option:router,10.1.0.1", "tag:sub-s1,option:dns-server,169.254.20.10",
                    "tag:sub-s1,option:mtu,1450", "tag:sub-s1,option:domain-name,n.tether.local"]


def test_the_mtu_offered_is_the_taps_over_an_ipv6_underlay_too() -> None:
    """VXLAN over IPv6 costs 70 bytes (names.vxlan_overhead), as the tap's MTU (vmports.wanted_vifs)."""
    opts = dnsmasq_config(replica(), "h1", 1500, "169.254.20.10", overhead=vxlan_overhead("fd00::1")).opts
    assert "tag:sub-s1,option:mtu,1430" in opts.splitlines()


def test_subnet_dns_servers_replace_the_agents_and_host_routes_come_with_the_default_route() -> None:
    r = replica(dns_nameservers=["10.9.9.9", "10.9.9.8"],
                host_routes=[HostRoute(destination="192.168.50.0/24", nexthop="10.1.0.254")])
    opts = dnsmasq_config(r, "h1", 1500, "169.254.20.10").opts.splitlines()
    assert "tag:sub-s1,option:dns-server,10.9.9.9,10.9.9.8" in opts
    # a client that takes option 121 ignores the router option (RFC 3442): the default route is in it
    assert "tag:sub-s1,option:classless-static-route,192.168.50.0/24,10.1.0.254,0.0.0.0/0,10.1.0.1" in opts


def test_no_dhcp_subnet_disabled_port_or_no_gateway() -> None:
    assert dnsmasq_config(replica(enable_dhcp=False), "h1", 1500, None).empty
    r = replica()
    r.objects["Endpoint"][PORT] = r.objects["Endpoint"][PORT].model_copy(update={"admin_state_up": False})
    assert dnsmasq_config(r, "h1", 1500, None).empty
    r = replica()
    s = r.objects["Network"]["n"].subnets[0]
    r.objects["Network"]["n"].subnets[0] = s.model_copy(update={"gateway": None})
    opts = dnsmasq_config(r, "h1", 1500, None).opts.splitlines()
    assert opts[0] == "tag:sub-s1,option:router" and not any("dns-server" in o for o in opts)


def test_dhcp_passes_a_vm_ports_anti_spoofing_and_reaches_the_host_whatever_its_groups() -> None:
    r = replica()
    r.objects["SecurityGroup"]["g"] = SecurityGroup(name="g", id="g", rules=[])  # no egress rule at all
    r.objects["Endpoint"][PORT] = r.objects["Endpoint"][PORT].model_copy(
        update={"security_groups": ["g"], "port_security": True})
    nft = compute_plan(r, HostContext("h1", "eth0", 1500)).nft
    ing = "\n".join(nft.chain(f"ing-{TAP}").rules)
    assert ing.index("DHCP from a VM port") < ing.index("spoofed source address")
    assert ing.index("spoofed source MAC") < ing.index("DHCP from a VM port")  # only from its own MAC
    assert "DHCP" not in "\n".join(nft.chain("ing-tthpod").rules)
    inp = "\n".join(nft.chain("input").rules)
    assert inp.index("DHCP from a VM port") < inp.index("@ep_out") and TAP in inp


def test_each_agent_has_its_own_dnsmasq_directory_under_run() -> None:
    from tether.calc.names import DHCP_RUN_DIR, dhcp_dir

    a, b = dhcp_dir("h1", "/run/tether-lab/t1/h1"), dhcp_dir("h1", "/run/tether-lab/t2/h1")
    assert a != b and a.startswith(DHCP_RUN_DIR + "/h1-") and dhcp_dir("h1", "/run/tether-lab/t1/h1") == a
    assert "/" not in dhcp_dir("../../etc", "/x").removeprefix(DHCP_RUN_DIR + "/")
