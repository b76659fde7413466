"""CNI portMappings (podman -p, Kubernetes hostPort) become a NodePort service published on the
container's host only; what Tether cannot publish is refused as invalid config, with the reason."""

from __future__ import annotations

import pytest

from tether.agent.cni import protocol as cp
from tether.agent.cni.server import host_port_service
from tether.calc.names import host_port_name
from tether.model import Endpoint

EP = Endpoint(name="web", network="blue", host="h1", ips=["10.1.0.5"])


def test_port_mappings_publish_on_the_containers_host_only() -> None:
    svc = host_port_service([{"hostPort": 8081, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                             {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}], "h/eth0", EP, "h1")
    assert svc.name == host_port_name("h/eth0") and svc.type == "NodePort"
    assert svc.host == "h1" and svc.host_ip is None
    assert [(p.protocol, p.node_port, p.target_port) for p in svc.ports] == [("TCP", 8081, 80), ("UDP", 5353, 53)]
    assert [(b.ip, b.endpoint) for b in svc.backends] == [("10.1.0.5", EP.id)]
    one = host_port_service([{"hostPort": 8081, "containerPort": 80, "hostIP": "192.0.2.1"}], "h/eth0", EP, "h1")
    assert one.host_ip == "192.0.2.1"


@pytest.mark.parametrize(("maps", "why"), [
    ([{"hostPort": 0, "containerPort": 80}], "1-65535"),
    ([{"hostPort": 81, "containerPort": 80, "protocol": "sctp"}], "not SCTP"),
    ([{"hostPort": 81, "containerPort": 80, "hostIP": "::1"}], "IPv4"),
    ([{"hostPort": 81, "containerPort": 80, "hostIP": "192.0.2.1"}, {"hostPort": 82, "containerPort": 80}], "one"),
    ({"hostPort": 81}, "list"),
])
def test_port_mappings_tether_cannot_publish_are_refused_as_invalid_config(maps, why: str) -> None:
    with pytest.raises(cp.CniError) as e:
        host_port_service(maps, "h/eth0", EP, "h1")
    assert e.value.code == cp.INVALID_CONFIG and why in e.value.msg
