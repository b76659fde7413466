"""Networks that cannot work are refused with the reason, and the cluster keeps working (issue 22):
a subnet on the hosts' underlay, in link-local space or in the service range, and `direct`
encapsulation while the hosts span two underlay subnets (the lab's h3 is on 198.18.1.0/24)."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tether.client import ApiError
from tether.lab.cluster import Lab
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab

REFUSED = [
    ("vxlan", "198.18.0.0/24", 409, "underlay"),       # h1 and h2's underlay: a pod would get a host's address
    ("vxlan", "169.254.100.0/24", 400, "link-local"),  # where the agents' DNS and VTEP addresses live
    ("vxlan", "10.96.0.0/20", 400, "service"),         # a pod would share an address with a service VIP
    ("direct", "10.64.0.0/16", 409, "auto"),           # h3 is on another underlay subnet: plain routes cannot reach it
]


def test_networks_that_cannot_work_are_refused_and_pods_keep_reaching_each_other(lab: Lab) -> None:
    c = lab.client()
    net = unique("ok")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.63.0.0/16")], encap="vxlan"))
    a = lab.run_pod("h1", unique("a"), net)
    b = lab.run_pod("h3", unique("b"), net)
    assert lab.reaches(f"h1/{a.name}", b.ip) and lab.reaches(f"h3/{b.name}", a.ip)
    before = sorted(n.name for n in c.list("Network"))

    for encap, cidr, status, why in REFUSED:
        with pytest.raises(ApiError) as e:
            c.create_network(Network(name=unique("bad"), subnets=[Subnet(cidr=cidr)], encap=encap))
        assert e.value.status == status, (cidr, e.value.detail)
        assert why in e.value.detail, (cidr, e.value.detail)

    assert sorted(n.name for n in c.list("Network")) == before  # nothing was left behind
    assert lab.reaches(f"h1/{a.name}", b.ip) and lab.reaches(f"h3/{b.name}", a.ip)
    fresh = lab.run_pod("h2", unique("c"), net)  # a new pod still starts and is reachable
    assert lab.reaches(f"h2/{fresh.name}", a.ip) and lab.reaches(f"h1/{a.name}", fresh.ip)
