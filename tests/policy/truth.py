"""Truth tables in the style of the upstream Kubernetes netpol e2e tests, with real packets.

Namespaces x, y, z with pods a, b, c each, spread over three lab hosts. Every pod runs one probe
server (TCP and UDP on 80 and 81, see `tether.lab.probe`); a matrix is every ordered pod pair on
TCP/80, TCP/81, UDP/80, UDP/81, probed in parallel (each source pod tries all its targets at once).
The expected matrix comes from `tether.policy_eval` over the server's state, never from the compiler.
A scenario passes when a probe round equals the expectation; rounds repeat until the agents have
converged or the deadline passes, then the last difference is reported.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tether.cli.policy_cli import trace_once
from tether.lab.cluster import Lab, stop_pid, wait_for
from tether.lab.probe import ask
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, SecurityGroup, Subnet
from tether.policy_eval import World, decide

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
HOSTS = ("h1", "h2", "h3")
PROBES = ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"))
PORT_DECLS = [{"name": "serve-80-tcp", "port": 80, "protocol": "TCP"},
              {"name": "serve-81-tcp", "port": 81, "protocol": "TCP"},
              {"name": "serve-80-udp", "port": 80, "protocol": "UDP"},
              {"name": "serve-81-udp", "port": 81, "protocol": "UDP"}]
Key = tuple[str, str, int, str]


@dataclass
class Pod:
    key: str  # "x/a"
    namespace: str
    host: str
    ref: str  # lab reference "h1/xa"
    ip: str
    endpoint_id: str
    control: str
    pid: int
    ip6: str | None = None  # on a dual-stack network

    def address(self, family: int) -> str:
        """The pod's address of IP version `family` (the truth tables run over either)."""
        if family == 6:
            assert self.ip6, f"{self.key} has no IPv6 address: make the network dual-stack"
            return self.ip6
        return self.ip


class Cluster:
    """The 9 pods of the truth tables (plus any added by a scenario) on one network of a lab."""

    def __init__(self, lab: Lab, prefix: str, network: str, namespaces: tuple[str, ...] = NAMESPACES) -> None:
        self.lab = lab
        self.prefix = prefix  # keeps namespace names unique per lab
        self.network = network
        self.namespaces = namespaces
        self.pods: dict[str, Pod] = {}
        self.base: set[str] = set()  # the pods of `create()`; scenarios may add more
        self.client = lab.client()
        self.timeout = float(os.environ.get("TETHER_PROBE_TIMEOUT", "0.5"))

    # --- set-up -------------------------------------------------------------------------------

    def ns(self, short: str) -> str:
        return f"{self.prefix}{short}"

    def create(self) -> None:
        for n in self.namespaces:
            self.client.apply(Namespace(name=self.ns(n), labels={"ns": n}))
        spread = itertools.cycle(HOSTS)
        for n in self.namespaces:
            for p in PODS:
                self.add_pod(n, p, next(spread), {"pod": p})
        self.base = set(self.pods)

    def add_pod(self, ns: str, name: str, host: str, labels: dict[str, str], network: str | None = None) -> Pod:
        pod_name = f"{self.prefix}{ns}{name}"
        info = self.lab.run_pod(host, pod_name, network or self.network, namespace=self.ns(ns), labels=labels,
                                ports=PORT_DECLS)
        control = os.path.join(self.lab.dir, f"probe-{pod_name}.sock")
        proc = subprocess.Popen(["ip", "netns", "exec", info.ns, sys.executable, "-m", "tether.lab.probe", "serve",
                                 "--control", control], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        ep = next(e for e in self.client.list_raw("Endpoint", namespace=self.ns(ns)) if e["name"] == pod_name)
        pod = Pod(f"{ns}/{name}", self.ns(ns), host, f"{host}/{pod_name}", info.ip, ep["id"], control, proc.pid,
                  next((ip for ip in info.ips if ":" in ip), None))
        self.pods[pod.key] = pod
        wait_for(lambda: os.path.exists(control), 15, f"the probe server of {pod.key}")
        return pod

    def remove_pod(self, key: str) -> None:
        pod = self.pods.pop(key)
        stop_pid(pod.pid, signal.SIGKILL, wait=2)
        self.lab.rm_pod(pod.ref)

    def close(self) -> None:
        for pod in self.pods.values():
            stop_pid(pod.pid, signal.SIGKILL, wait=2)

    # --- changes --------------------------------------------------------------------------------

    def policy(self, ns: str, name: str, spec: dict) -> NetworkPolicy:
        pol = NetworkPolicy(name=name, namespace=self.ns(ns), spec=spec)
        return self.client.apply(pol)  # type: ignore[return-value]

    def clear_policies(self) -> None:
        for p in self.client.list_raw("NetworkPolicy"):
            if p["namespace"].startswith(self.prefix):
                self.client.delete("NetworkPolicy", f"{p['namespace']}/{p['name']}")

    def label_pod(self, key: str, labels: dict[str, str]) -> None:
        self.client.request("PATCH", f"/api/v1/endpoints/{self.pods[key].endpoint_id}", json={"labels": labels})

    def label_namespace(self, short: str, labels: dict[str, str]) -> None:
        self.client.apply(Namespace(name=self.ns(short), labels=labels))

    def set_groups(self, key: str, groups: list[str], port_security: bool | None = None) -> None:
        """Naming a group turns the pod's port security on; it stays on when the groups go (then the
        pod passes nothing) unless `port_security=False` turns it off again."""
        change: dict = {"security_groups": groups}
        if port_security is not None:
            change["port_security"] = port_security
        self.client.request("PATCH", f"/api/v1/endpoints/{self.pods[key].endpoint_id}", json=change)

    # --- expectation and probes ---------------------------------------------------------------

    def world(self) -> World:
        snap = self.client.snapshot()
        by_kind: dict[str, list] = {}
        classes = {"Endpoint": Endpoint, "Namespace": Namespace, "NetworkPolicy": NetworkPolicy,
                   "SecurityGroup": SecurityGroup, "Network": Network, "Host": Host}
        for item in snap["objects"]:
            cls = classes.get(item["kind"])
            if cls is not None:
                by_kind.setdefault(item["kind"], []).append(cls.model_validate(item["object"]))
        return World(endpoints=by_kind.get("Endpoint", []), namespaces=by_kind.get("Namespace", []),
                     policies=by_kind.get("NetworkPolicy", []), security_groups=by_kind.get("SecurityGroup", []),
                     networks=by_kind.get("Network", []), hosts=by_kind.get("Host", []))

    def expected(self, world: World | None = None, family: int = 4) -> dict[Key, bool]:
        """Through `tether trace`'s own resolution and parsing (NAMESPACE/NAME, DST:PORT/PROTO), so every
        truth-table case is also a case where trace must agree with the probe. IPv6 (`family=6`): the
        decision between the two pods' IPv6 addresses (an endpoint named by address is judged by it)."""
        world = world or self.world()
        names = {e.id: f"{e.namespace}/{e.name}" for e in world.endpoints}
        out = {}
        for s, d in itertools.product(self.pods.values(), repeat=2):
            for port, proto in PROBES:
                if family == 6:
                    decision = decide(world, s.address(6), d.address(6), port, proto)
                else:
                    *_, decision = trace_once(world, names[s.endpoint_id], f"{names[d.endpoint_id]}:{port}/{proto}")
                out[(s.key, d.key, port, proto)] = decision.allowed
        return out

    def probe(self, family: int = 4) -> dict[Key, bool]:
        pods = list(self.pods.values())

        def from_pod(src: Pod) -> dict[Key, bool]:
            targets = [(d, port, proto) for d in pods for port, proto in PROBES]
            got = ask(src.control, [(d.address(family), port, proto) for d, port, proto in targets], self.timeout)
            return {(src.key, d.key, port, proto): ok for (d, port, proto), ok in zip(targets, got, strict=True)}

        out: dict[Key, bool] = {}
        with ThreadPoolExecutor(len(pods)) as ex:
            for part in ex.map(from_pod, pods):
                out.update(part)
        return out

    def converge(self, deadline: float = 10.0, family: int = 4) -> list[str]:
        """Probe until reality equals the expectation; the differences of the last round otherwise."""
        want = self.expected(family=family)
        end = time.monotonic() + deadline
        v = " IPv6" if family == 6 else ""
        while True:
            got = self.probe(family)
            diff = [f"{s} -> {d}{v} {proto}/{port}: expected {'allow' if want[k] else 'deny'}, got "
                    f"{'allow' if got[k] else 'deny'}" for k in sorted(want) for s, d, port, proto in [k]
                    if got[k] != want[k]]
            if not diff or time.monotonic() > end:
                return diff
            want = self.expected(family=family)  # the state may still be settling (an event in flight)

    def table(self, matrix: dict[Key, bool], port: int, proto: str) -> str:
        """The upstream-style picture of one protocol/port: rows are sources, columns destinations."""
        keys = list(self.pods)
        lines = [f"{proto}/{port}  " + " ".join(k.replace("/", "") for k in keys)]
        for s in keys:
            lines.append(f"{s.replace('/', ''):>8} " + "  ".join("." if matrix[(s, d, port, proto)] else "X"
                                                             for d in keys))
        return "\n".join(lines)


def make_network(lab: Lab, name: str, *cidrs: str) -> str:
    """A vxlan network with one subnet per CIDR (an IPv4 and an IPv6 one make it dual-stack)."""
    lab.client().create_network(Network(name=name, subnets=[Subnet(cidr=c) for c in cidrs], encap="vxlan"))
    return name


@contextmanager
def running_cluster(lab: Lab, network: str, prefix: str, *cidrs: str) -> Iterator[Cluster]:
    """The x/y/z namespaces with pods a/b/c on a new network of `lab`, closed even on failure."""
    c = Cluster(lab, prefix, make_network(lab, network, *cidrs))
    try:
        c.create()
        yield c
    finally:
        c.close()
