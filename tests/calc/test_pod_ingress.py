"""Each local pod interface's ingress chain (pure): anti-spoofing by compares against that pod's
values, then the stateless chain (with conntrack) or isolation at the sender (without); and when
the table does without conntrack at all (calc.needs_state)."""

from __future__ import annotations

import json

from tests.calc.test_host import CTX, replica
from tether.calc import pod_ingress
from tether.calc.host import compute_nft, needs_state
from tether.calc.memos import Memos
from tether.calc.names import stateless_chain
from tether.model import AddressPair, Endpoint, Network, NetworkPolicy, Service, ServicePort, Subnet


def body(chain) -> str:
    return "\n".join(chain.rules)


def test_a_pod_may_send_from_its_addresses_macs_address_pairs_and_nested_children_only() -> None:
    r = replica()
    e0 = r.objects["Endpoint"]["e0"]
    r.objects["Endpoint"]["e0"] = e0.model_copy(update={"mac": "02:00:00:00:00:01", "allowed_address_pairs": [
        AddressPair(ip_address="10.1.200.0/24", mac_address="02:AA:BB:CC:DD:EE")]})
    r.objects["Endpoint"]["kid"] = Endpoint(id="kid", name="kid", network="n", host="h1", ips=["10.1.5.5"],
                                            mac="02:00:00:00:55:55", parent="e0")
    ing = compute_nft(r, CTX).chain("ing-tthe0")
    assert ing is not None and ing.hook == "ingress" and ing.device == "tthe0" and ing.priority < -300
    rules = [json.loads(x) for x in ing.rules]
    mac = next(x for x in rules if x.get("comment") == pod_ingress.SPOOFED_MAC)
    assert mac["expr"][0]["match"]["op"] == "!=" and mac["expr"][0]["match"]["right"] == {
        "set": ["02:00:00:00:00:01", "02:00:00:00:55:55", "02:aa:bb:cc:dd:ee"]}
    v4, v6 = [x for x in rules if x.get("comment") == pod_ingress.SPOOFED_ADDRESS]
    assert v4["expr"][0]["match"]["right"] == {"set": [
        "10.1.0.1", {"prefix": {"addr": "10.1.200.0", "len": 24}}, "10.1.5.5"]}
    assert v6["expr"][0]["match"]["right"] == {"prefix": {"addr": "fe80::", "len": 10}}  # link-local only
    assert all("log" in str(x["expr"]) and "drop" in str(x["expr"]) for x in (mac, v4, v6))
    # nothing for the remote pods; a pod without a MAC is still pinned to its address
    assert compute_nft(r, CTX).chain("ing-tthe1") is None
    assert pod_ingress.SPOOFED_MAC not in body(compute_nft(replica(), CTX).chain("ing-tthe0"))


def test_with_conntrack_a_checked_packet_goes_on_to_its_networks_stateless_chain() -> None:
    r = replica()
    r.objects["Network"]["m"] = Network(name="m", subnets=[Subnet(cidr="10.2.0.0/16")], nat_outgoing=True)
    r.objects["Endpoint"]["kid"] = Endpoint(id="kid", name="kid", network="m", host="h1", ips=["10.2.0.9"],
                                            parent="e0")
    assert needs_state(r) == "a nat-outgoing network"
    rules = compute_nft(r, CTX).chain("ing-tthe0").rules
    assert pod_ingress.VXLAN_FROM_POD in rules[-3] and "@vxlan_peers" in rules[-3]  # masqueraded VXLAN
    assert '"10.2.0.9"' in rules[-2] and stateless_chain("m") in rules[-2]  # the nested one by its address
    assert json.loads(rules[-1])["expr"] == [{"goto": {"target": stateless_chain("n")}}]
    assert "isolation" not in "\n".join(rules)  # with conntrack, isolation is the receiver's `in-` chain


def test_without_anything_stateful_the_table_has_no_conntrack_and_isolates_at_the_sender() -> None:
    r = replica()
    r.objects["Network"]["m"] = Network(name="m", subnets=[Subnet(cidr="10.2.0.0/16"), Subnet(cidr="fd02::/64")])
    assert needs_state(r) == ""
    plan = compute_nft(r, CTX)
    text = json.dumps([c.rules for c in plan.chains])
    assert '\\"ct\\"' not in text and "notrack" not in text and "masquerade" not in text
    assert {c.hook for c in plan.chains} == {"ingress"}  # no base chain: each would be a hook call per packet
    rules = [json.loads(x) for x in plan.chain("ing-tthe0").rules]
    assert [x.get("comment") for x in rules] == [pod_ingress.SPOOFED_ADDRESS, None, "DAD and MLD from ::",
                                                 pod_ingress.SPOOFED_ADDRESS, pod_ingress.VXLAN_FROM_POD,
                                                 "deny out isolation n", "deny out isolation n"]  # v4, v6
    own = rules[1]["expr"]  # same network: accepted right after the check of its source
    assert own == [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                              "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}}, {"accept": None}]
    assert rules[5]["expr"][1]["match"]["right"] == {"prefix": {"addr": "10.2.0.0", "len": 16}}
    # no host checks VXLAN's outer source here, so a pod's own is dropped unless to its own network
    vxlan = [m["match"] for m in rules[4]["expr"][:3]]
    assert [(m["op"], m["right"]) for m in vxlan] == [("==", "ipv4"), ("!=", {"prefix": {"addr": "10.1.0.0",
                                                                                        "len": 16}}), ("==", 4789)]
    # each of these turns conntrack on, on every host
    for change, why in ((lambda: r.objects["Service"].__setitem__("d/s", Service(
            name="s", namespace="d", selector={"a": "b"}, ports=[ServicePort(port=80)])), "services"),
                        (lambda: r.objects["NetworkPolicy"].__setitem__("d/p", NetworkPolicy(
                            name="p", namespace="d", spec={"podSelector": {}})), "network policies")):
        change()
        assert needs_state(r) == why
        assert compute_nft(r, CTX).chain("raw_prerouting") is not None
        r.objects["Service"].clear()


def test_a_replaced_endpoint_or_a_changed_mode_gets_a_new_chain() -> None:
    r = replica()
    memos = Memos()  # one agent's, kept from plan to plan
    first = compute_nft(r, CTX, memos).chain("ing-tthe0")
    assert compute_nft(r, CTX, memos).chain("ing-tthe0") is first  # kept from the last plan
    r.objects["Endpoint"]["e0"] = r.objects["Endpoint"]["e0"].model_copy(update={"ips": ["10.1.0.7"]})
    second = compute_nft(r, CTX, memos).chain("ing-tthe0")
    assert '"10.1.0.7"' in body(second) and '"10.1.0.1"' not in body(second)
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})
    assert stateless_chain("n") in body(compute_nft(r, CTX, memos).chain("ing-tthe0"))


def test_ipv6_from_the_unspecified_address_passes_only_for_duplicate_address_detection_and_mld() -> None:
    """A new pod's IPv6 stack sends neighbour solicitations (DAD) and MLD reports from `::`: they pass
    before the source check; nothing else from `::` is allowed (it is not in the allowed sources)."""
    r = replica()
    chain = compute_nft(r, CTX).chain("ing-tthe0")
    rules = [json.loads(x) for x in chain.rules]
    i = next(n for n, x in enumerate(rules) if x.get("comment") == "DAD and MLD from ::")
    spoof6 = next(n for n, x in enumerate(rules) if x.get("comment") == pod_ingress.SPOOFED_ADDRESS
                  and "ip6" in json.dumps(x))
    assert i < spoof6
    expr = rules[i]["expr"]
    assert expr[0]["match"]["right"] == "::"
    assert expr[1]["match"]["right"] == {"prefix": {"addr": "ff02::", "len": 16}}
    assert set(expr[2]["match"]["right"]["set"]) == {"nd-neighbor-solicit", "mld-listener-report",
                                                      "mld2-listener-report"}
    assert '"::"' not in json.dumps(rules[spoof6])
def test_a_disabled_endpoint_sends_nothing_and_one_without_anti_spoofing_sends_from_anywhere() -> None:
    """Neutron's `port set --disable` and `port_security_enabled=false` on the pod's own chain."""
    r = replica()
    e0 = r.objects["Endpoint"]["e0"]
    r.objects["Endpoint"]["e0"] = e0.model_copy(update={"mac": "02:00:00:00:00:01", "admin_state_up": False})
    rules = [json.loads(x) for x in compute_nft(r, CTX).chain("ing-tthe0").rules]
    assert [x["comment"] for x in rules] == [pod_ingress.PORT_DISABLED]
    assert [list(s) for s in rules[0]["expr"]][-1] == ["drop"]  # no match: everything

    r.objects["Endpoint"]["e0"] = e0.model_copy(update={"mac": "02:00:00:00:00:01", "anti_spoofing": False})
    text = body(compute_nft(r, CTX).chain("ing-tthe0"))
    assert pod_ingress.SPOOFED_MAC not in text and pod_ingress.SPOOFED_ADDRESS not in text
    assert pod_ingress.PORT_DISABLED not in text


def test_port_security_on_always_means_anti_spoofing() -> None:
    ep = Endpoint(name="p", network="n", port_security=True, anti_spoofing=False)
    assert ep.anti_spoofing
    assert Endpoint(name="p", network="n", security_groups=["g1"], anti_spoofing=False).anti_spoofing
    assert not Endpoint(name="p", network="n", anti_spoofing=False).anti_spoofing


def test_an_ipv6_packet_to_its_own_network_leaves_on_compares_as_early_as_ipv4s() -> None:
    """bench/dataplane vxlan6: without conntrack, a dual-stack pod's IPv6 packet from its address to
    its network is accepted right after IPv4's two rules, before the `::` and link-local rules; the
    IPv6 source check compares (its address, fe80::/10) instead of looking up an anonymous set."""
    r = replica()
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16"), Subnet(cidr="fd01::/64")])
    e0 = r.objects["Endpoint"]["e0"]
    r.objects["Endpoint"]["e0"] = e0.model_copy(update={"ips": [*e0.ips, "fd01::1"]})
    rules = [json.loads(x) for x in compute_nft(r, CTX).chain("ing-tthe0").rules]
    fast = rules[2]["expr"]
    assert fast == [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                               "right": "fd01::1"}},
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                               "right": {"prefix": {"addr": "fd01::", "len": 64}}}}, {"accept": None}]
    assert rules[3].get("comment") == "DAD and MLD from ::"
    spoof6 = rules[4]
    assert spoof6["comment"] == pod_ingress.SPOOFED_ADDRESS and '"set"' not in json.dumps(spoof6)
    assert [m["match"]["right"] for m in spoof6["expr"][:2]] == ["fd01::1", {"prefix": {"addr": "fe80::", "len": 10}}]
    assert all(m["match"]["op"] == "!=" for m in spoof6["expr"][:2])
    # with conntrack there is no accept here (the forward chain decides): no fast rule
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})
    assert not any(x["expr"][-1] == {"accept": None} for x in
                   (json.loads(y) for y in compute_nft(r, CTX).chain("ing-tthe0").rules) if "fd01::1" in json.dumps(x))
