"""A scale lab's population: endpoints, NetworkPolicies and services registered through the REST API.

`objects(size, hosts)` is the pure part: what to register for a cluster of `size` on the given
hosts, deterministic (the same size gives the same objects, so two runs compare). `populate()`
registers it with the real `tether server` API, many requests in flight at once, as runtimes on many
hosts would.

The endpoints are what a runtime registers for a pod (name, network, host, namespace, labels,
declared ports; the server allocates the addresses from the host's blocks), without a kernel
interface: each costs the control plane and every agent what a pod does (addresses, blocks and
routes to them, policy address sets, service backends) but no veth. A few real pods per host,
made by `Lab.run_pod` through the CNI plugin, carry the probes (see bench/scale.py).

Shape (a modest microservice cluster): `NAMESPACES` namespaces, `APPS` apps per namespace, each
endpoint in app `a<k>` of namespace `scale-<n>`; policy j selects one app and admits another app of
the same namespace on TCP 8080; service k selects one app. No object selects the namespace
`default`, where the probe pods live, so the population never changes what the probes see.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from tether.model import Endpoint, Namespace, Network, NetworkPolicy, PortDecl, Service, ServicePort, Subnet

NAMESPACES = 10
APPS = 50  # per namespace
NETWORK = "scale"
CIDR = "10.128.0.0/12"  # 1M addresses, clear of the service range 10.96.0.0/16 and the lab's 10.x tests


@dataclass(frozen=True)
class Size:
    hosts: int
    endpoints: int
    policies: int
    services: int

    def label(self) -> str:
        return f"{self.hosts}h/{self.endpoints}ep/{self.policies}np/{self.services}svc"


SMALL = Size(10, 1_000, 100, 50)
LARGE = Size(100, 10_000, 1_000, 500)


@dataclass
class Population:
    namespaces: list[Namespace]
    network: Network
    endpoints: list[Endpoint]
    policies: list[NetworkPolicy]
    services: list[Service]


def app_of(i: int) -> tuple[str, str]:
    """The namespace and app of the i-th object (endpoints, policies and services share the spread)."""
    return f"scale-{i % NAMESPACES}", f"a{(i // NAMESPACES) % APPS}"


def objects(size: Size, hosts: list[str]) -> Population:
    """Everything a cluster of `size` holds on `hosts`, endpoints spread evenly (round robin)."""
    if not hosts:
        raise ValueError("no hosts to place endpoints on")
    namespaces = [Namespace(name=f"scale-{n}", labels={"kubernetes.io/metadata.name": f"scale-{n}", "scale": "1"})
                  for n in range(NAMESPACES)]
    network = Network(name=NETWORK, subnets=[Subnet(cidr=CIDR)], encap="vxlan")
    eps = []
    for i in range(size.endpoints):
        ns, app = app_of(i)
        eps.append(Endpoint(name=f"s{i}", network=NETWORK, host=hosts[i % len(hosts)], namespace=ns,
                            labels={"app": app, "gen": "scale"}, ports=[PortDecl(name="http", port=8080)]))
    pols = []
    for j in range(size.policies):
        ns, app = app_of(j)
        _ns, peer = app_of(j + NAMESPACES)  # the next app of the same namespace
        pols.append(NetworkPolicy(name=f"np{j}", namespace=ns, spec={
            "podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}]}))
    svcs = []
    for k in range(size.services):
        ns, app = app_of(k)
        svcs.append(Service(name=f"svc{k}", namespace=ns, network=NETWORK, selector={"app": app},
                            ports=[ServicePort(name="http", port=80, target_port=8080)]))
    return Population(namespaces, network, eps, pols, svcs)


async def _register(server: str, token: str, pop: Population, concurrency: int,
                    progress: Callable[[str], None]) -> dict[str, float]:
    from tether.client import ApiError, AsyncTetherClient

    client = AsyncTetherClient(server, token, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    took: dict[str, float] = {}

    serial = asyncio.Semaphore(1)  # services one at a time: concurrent creates race for cluster IPs (409s, retries)

    async def one(call, gate: asyncio.Semaphore = gate) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    await call()
                    return
                except ApiError as e:
                    if e.status == 409 and "already exists" in e.detail:
                        return  # a retry of ours that had gone through: populate() may be run again
                    # concurrent service creates can be given the same cluster IP: the loser's 409 says
                    # "is already used"; its retry gets another address
                    if (e.status < 500 and "is already used" not in e.detail) or attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))

    try:
        for ns in pop.namespaces:
            await client.apply(ns)
        try:
            await client.request("POST", "/api/v1/networks", content=pop.network.model_dump_json(exclude={"revision"}))
        except ApiError as e:
            if e.status != 409:
                raise
        for kind, items, call in (("endpoints", pop.endpoints, client.create_endpoint),
                                  ("policies", pop.policies, client.apply), ("services", pop.services, client.apply)):
            t0 = time.monotonic()
            step = max(1, len(items) // 10)
            for first in range(0, len(items), step):
                batch = items[first:first + step]
                await asyncio.gather(*(one(lambda o=o, call=call: call(o), serial if kind == "services" else gate)
                                       for o in batch))
                if len(items) >= 500:
                    progress(f"{kind}: {first + len(batch)}/{len(items)}")
            took[kind] = round(time.monotonic() - t0, 2)
    finally:
        await client.close()
    return took


def populate(server: str, token: str, pop: Population, concurrency: int = 16,
             progress: Callable[[str], None] = lambda _m: None) -> dict[str, float]:
    """Register `pop` through the API (`concurrency` requests in flight); seconds taken per kind."""
    return asyncio.run(_register(server, token, pop, concurrency, progress))
