"""A small cluster model for policy tests: namespaces x, y, z with pods a, b, c, spread over 3 hosts."""

from __future__ import annotations

from tether.calc.replica import Replica
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, PortDecl, SecurityGroup, Subnet

HOSTS = ("h1", "h2", "h3")
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")


def host_of(ns: str, pod: str) -> str:
    return HOSTS[(NAMESPACES.index(ns) + PODS.index(pod)) % 3]


def make_replica(extra_networks: bool = True) -> Replica:
    r = Replica()
    for i, h in enumerate(HOSTS):
        r.objects["Host"][h] = Host(name=h, underlay_ip=f"198.18.0.{i + 1}", vtep_ip=f"169.254.64.{i + 1}")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16")])
    if extra_networks:
        r.objects["Network"]["m"] = Network(name="m", subnets=[Subnet(cidr="10.2.0.0/16")])
    for ns in NAMESPACES:
        r.objects["Namespace"][ns] = Namespace(name=ns, labels={"ns": ns})
    for i, ns in enumerate(NAMESPACES):
        for j, pod in enumerate(PODS):
            ep = Endpoint(id=f"{ns}{pod}", name=f"{ns}{pod}", network="n", host=host_of(ns, pod), namespace=ns,
                          ips=[f"10.1.{i}.{j + 1}"], mac=f"02:00:00:00:0{i}:0{j}", labels={"pod": pod},
                          interface=f"tth{ns}{pod}", ports=[PortDecl(name="serve-80", port=80),
                                                            PortDecl(name="serve-81-udp", port=81, protocol="UDP")])
            r.objects["Endpoint"][ep.id] = ep
    return r


def add(r: Replica, obj) -> None:
    r.objects[obj.kind][obj.store_name()] = obj


def policy(name: str, ns: str, spec: dict) -> NetworkPolicy:
    return NetworkPolicy(id=f"pol-{ns}-{name}", name=name, namespace=ns, spec=spec)


__all__ = ["SecurityGroup", "add", "host_of", "make_replica", "policy"]
