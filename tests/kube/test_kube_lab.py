"""Tether as a Kubernetes cluster's network, with real packets: a real kube-apiserver (tools/k8s),
`kubectl apply`, `tether kube`, and pods on two lab hosts started exactly as kubelet calls CNI (no
labels: they come from the apiserver through the controller).

One lab, apiserver and controller for the module; the tests run in order (the last deletes a Node).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time

import pytest

from tests.fixtures.lab import make_lab, unique
from tests.services.probes import connect_many, start_server, stop
from tether.lab.cluster import Lab, PodInfo, nsx, stop_pid, wait_for
from tether.lab.containerd import Containerd
from tether.lab.kube import (
    KubeApi,
    k8s_bin,
    node_manifest,
    pod_manifest,
    run_kube_pod,
    start_controller,
    sync_endpoint_slice,
)
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
PORT = 8080


class World:
    def __init__(self, lab: Lab, kube: KubeApi) -> None:
        self.lab, self.kube = lab, kube
        self.net = unique("kn")
        self.servers: list = []
        self.stats = os.path.join(lab.dir, "kube-stats.json")
        self.controller = None

    def start_controller(self, stats: str | None = None) -> None:
        self.stats = stats or self.stats
        self.controller = start_controller(self.lab, self.kube, stats_file=self.stats)

    def stop_controller(self) -> None:
        if self.controller is not None:
            stop_pid(self.controller.pid)
            self.controller.wait()

    def written(self) -> list[str]:
        try:
            with open(self.stats) as f:
                return json.load(f)["written"]
        except (OSError, ValueError, KeyError):
            return []

    def stat(self) -> dict:
        with open(self.stats) as f:
            return json.load(f)

    def pod(self, host: str, name: str, ns: str, labels: dict, serve: bool = False,
            ports: list | None = None, kubeconfig: bool = False) -> PodInfo:
        p = run_kube_pod(self.lab, self.kube, host, name, self.net, namespace=ns, labels=labels, ports=ports,
                         kubeconfig=kubeconfig)
        if serve:
            self.servers.append(start_server(p.ns, p.name, PORT))
            wait_for(lambda: f":{PORT}" in nsx(p.ns, "ss", "-ltn").stdout, 10, "the pod's server")
        return p

    def endpoint_by_id(self, id: str) -> dict:
        [ep] = [e for e in self.lab.client().list_raw("Endpoint") if e["id"] == id]
        return ep

    def endpoint(self, pod: PodInfo) -> dict:
        [ep] = [e for e in self.lab.client().list_raw("Endpoint") if e["owner"].get("container_id") == pod.container_id]
        return ep


def reaches(src: PodInfo, ip: str, port: int = PORT) -> bool:
    return connect_many(src.ns, ip, port, 1, timeout=20)["failures"] == 0


def converge(pred, what: str, timeout: float = 30) -> None:
    wait_for(pred, timeout, what)


@pytest.fixture(scope="module")
def world(kube: KubeApi):
    lab = make_lab(hosts=2)
    w = World(lab, kube)
    try:
        lab.client().create_network(Network(name=w.net, subnets=[Subnet(cidr="10.62.0.0/16")]))
        kube.apply(node_manifest(lab))
        w.start_controller()
        yield w
    finally:
        w.stop_controller()
        for s in w.servers:
            stop(s)
        lab.down()


@pytest.fixture(scope="module")
def pods(world: World):
    """Namespaces a (team=a) and b (team=b); a server pod on h1 in a; clients on h2 in a and b."""
    a, b = unique("ka"), unique("kb")
    world.kube.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {a}, labels: {{team: a}}}}\n---\n"
                     f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {b}, labels: {{team: b}}}}\n")
    web = world.pod("h1", "web", a, {"app": "web"}, serve=True, ports=[{"name": "http", "containerPort": PORT}])
    c1 = world.pod("h2", "client", a, {"role": "client"})
    c2 = world.pod("h2", "client-b", b, {"role": "client"})  # lab pod names are per host
    return {"a": a, "b": b, "web": web, "c1": c1, "c2": c2}


def test_pod_labels_and_named_ports_reach_the_endpoints_kubelet_made_without_them(world: World, pods) -> None:
    converge(lambda: world.endpoint(pods["web"])["labels"] == {"app": "web"}, "the web pod's labels on its endpoint")
    assert world.endpoint(pods["web"])["ports"] == [{"name": "http", "port": PORT, "protocol": "TCP"}]
    converge(lambda: world.endpoint(pods["c2"])["labels"] == {"role": "client"}, "the client's labels")
    ns = world.lab.client().get("Namespace", pods["b"])
    assert ns.labels["team"] == "b"


def test_network_policy_pod_label_and_namespace_label_changes_take_effect(world: World, pods) -> None:
    web, c1, c2 = pods["web"], pods["c1"], pods["c2"]
    assert reaches(c1, web.ip) and reaches(c2, web.ip)  # no policy: open
    world.kube.apply(f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-in, namespace: {pods['a']}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from:
    - podSelector: {{matchLabels: {{role: client}}}}
    - namespaceSelector: {{matchLabels: {{team: trusted}}}}
    ports: [{{port: http}}]
""")
    converge(lambda: not reaches(c2, web.ip), "the policy to deny the other namespace's client")
    assert reaches(c1, web.ip), "the same namespace's client (role=client) is allowed"
    world.kube.kubectl("label", "pod", "-n", pods["a"], "client", "role=other", "--overwrite")
    converge(lambda: not reaches(c1, web.ip), "a pod label change to take the client out of the policy")
    world.kube.kubectl("label", "namespace", pods["b"], "team=trusted", "--overwrite")
    converge(lambda: reaches(c2, web.ip), "a namespace label change to let the other namespace in")
    world.kube.kubectl("label", "pod", "-n", pods["a"], "client", "role=client", "--overwrite")
    converge(lambda: reaches(c1, web.ip), "the label back")


def test_service_with_endpointslices_is_load_balanced_over_pods_on_two_hosts(world: World, pods) -> None:
    a = pods["a"]
    b1 = world.pod("h1", "api-1", a, {"app": "api"}, serve=True)
    b2 = world.pod("h2", "api-2", a, {"app": "api"}, serve=True)
    world.kube.apply(f"""apiVersion: v1
kind: Service
metadata: {{name: api, namespace: {a}}}
spec:
  ports: [{{name: http, port: 80, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-1
  namespace: {a}
  labels: {{kubernetes.io/service-name: api, endpointslice.kubernetes.io/managed-by: tests.tether.dev}}
addressType: IPv4
ports: [{{name: http, port: {PORT}, protocol: TCP}}]
endpoints:
- addresses: ["{b1.ip}"]
  conditions: {{ready: true}}
  nodeName: h1
- addresses: ["{b2.ip}"]
  conditions: {{ready: true}}
  nodeName: h2
""")
    vip = world.kube.kubectl("get", "svc", "-n", a, "api", "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    client = pods["c2"]
    converge(lambda: len(connect_many(client.ns, vip, 80, 20)["counts"]) == 2, "the service to balance over both pods")
    r = connect_many(client.ns, vip, 80, 200)
    assert r["failures"] == 0 and set(r["counts"]) == {"api-1", "api-2"} and min(r["counts"].values()) > 40, r


def test_controller_restart_apiserver_restart_and_410_neither_drop_nor_duplicate_changes(world: World, pods) -> None:
    a, b = pods["a"], pods["b"]
    time.sleep(2)  # quiet: every earlier change applied
    before = len(world.written())
    time.sleep(2)
    assert len(world.written()) == before, "an idle controller writes nothing"
    # 1. the controller is stopped; three changes are made; a new controller must apply exactly them
    world.stop_controller()
    world.kube.kubectl("label", "pod", "-n", a, "web", "ver=2")
    world.kube.kubectl("label", "namespace", a, "zone=z1")
    world.kube.apply(f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p2, namespace: {b}}}\n"
                     "spec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}\n")
    world.start_controller(os.path.join(world.lab.dir, "kube-stats-2.json"))
    converge(lambda: len(world.written()) >= 3, "the new controller to apply the changes made while it was away")
    time.sleep(3)
    written = world.written()
    assert sorted(w.split()[1] for w in written) == ["Endpoint", "Namespace", "NetworkPolicy"], written
    assert world.endpoint(pods["web"])["labels"] == {"app": "web", "ver": "2"}
    # 2. the controller is frozen; changes are made, etcd compacted and the apiserver restarted: its
    # watches come back to a resourceVersion that is gone (410), relist, and apply each change once
    os.kill(world.controller.pid, signal.SIGSTOP)
    try:
        world.kube.kubectl("label", "pod", "-n", a, "web", "ver=3", "--overwrite")
        world.kube.kubectl("delete", "networkpolicy", "-n", b, "p2")
        world.kube.compact()
        world.kube.restart_apiserver()
    finally:
        os.kill(world.controller.pid, signal.SIGCONT)
    converge(lambda: len(world.written()) >= 5, "the controller to apply the changes made across the 410", 60)
    time.sleep(3)
    written = world.written()[3:]
    assert sorted(w.split()[0] + " " + w.split()[1] for w in written) == ["delete NetworkPolicy", "patch Endpoint"], \
        written
    stats = world.stat()
    assert sum(stats["gone"].values()) >= 1, stats  # at least one watch saw 410 Gone and relisted
    assert world.endpoint(pods["web"])["labels"]["ver"] == "3"
    assert "p2" not in {p.name for p in world.lab.client().list("NetworkPolicy")}


def test_a_pod_is_selected_from_its_first_packet_when_its_cni_config_names_a_kubeconfig(world: World, pods) -> None:
    world.stop_controller()  # nobody else can give the endpoint its labels
    try:
        p = world.pod("h2", "early", pods["a"], {"app": "web", "tier": "x"}, kubeconfig=True,
                      ports=[{"name": "http", "containerPort": PORT}])
        ep = world.endpoint(p)
        assert ep["labels"] == {"app": "web", "tier": "x"}
        assert ep["ports"] == [{"name": "http", "port": PORT, "protocol": "TCP"}]
    finally:
        world.start_controller(os.path.join(world.lab.dir, "kube-stats-3.json"))
    converge(lambda: world.stat()["reconciles"] >= 1, "the controller to reconcile")
    assert not [w for w in world.written() if w.startswith(f"patch Endpoint {ep['id']}")]


def resolve(pod: PodInfo, name: str) -> list[str]:
    """What the pod's own resolver (glibc, reading the resolv.conf the CNI result gave: Tether's DNS
    at 169.254.20.10 and the namespace's search path) answers."""
    r = nsx(pod.ns, "getent", "ahostsv4", name, check=False, timeout=30)
    return sorted({line.split()[0] for line in r.stdout.splitlines()})


def test_a_headless_service_answers_dns_with_its_pods_addresses_and_follows_a_pod_deletion(world: World,
                                                                                           pods) -> None:
    a = pods["a"]
    d1 = world.pod("h1", "db-1", a, {"app": "db"})
    d2 = world.pod("h2", "db-2", a, {"app": "db"})
    world.kube.apply(f"""apiVersion: v1
kind: Service
metadata: {{name: db, namespace: {a}}}
spec:
  clusterIP: None
  selector: {{app: db}}
  ports: [{{name: pg, port: 5432}}]
""")
    assert world.kube.kubectl("get", "svc", "-n", a, "db", "-o", "jsonpath={.spec.clusterIP}").stdout == "None"
    both = sorted([d1.ip, d2.ip])
    assert sync_endpoint_slice(world.kube, a, "db") == both  # the EndpointSlice controller's part
    same_ns, other_ns = pods["c1"], pods["c2"]  # both on h2; db-1 is on h1
    converge(lambda: resolve(same_ns, "db") == both, "the headless service's short name to answer both pods")
    assert resolve(other_ns, f"db.{a}") == both
    assert resolve(other_ns, f"db.{a}.svc.tether.local") == both
    # the pod goes as in a cluster: deleted in the apiserver (terminating, so out of the slice), its
    # sandbox torn down by kubelet (CNI DEL), then the object removed
    world.kube.kubectl("delete", "pod", "-n", a, "db-2", "--wait=false")
    assert sync_endpoint_slice(world.kube, a, "db") == [d1.ip]
    world.lab.rm_pod("h2/db-2")
    world.kube.kubectl("delete", "pod", "-n", a, "db-2", "--grace-period=0", "--force")
    converge(lambda: resolve(same_ns, "db") == [d1.ip], "the deleted pod's address to leave the headless answer")
    assert resolve(other_ns, f"db.{a}") == [d1.ip]


def cni_args(s: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in s.split(";") if kv)


def test_containerds_cri_networks_a_pod_through_tether_with_the_cni_call_run_kube_pod_makes(world: World,
                                                                                           pods) -> None:
    """kubelet's runtime alone (test_kubelet_lab runs kubelet itself): containerd's CRI plugin, given
    kubelet's RunPodSandbox for a Pod bound to h1, calls Tether's CNI plugin itself."""
    lab, a = world.lab, pods["a"]
    world.kube.apply(pod_manifest("cri-pod", a, "h1", {"app": "cri"}))
    uid = world.kube.kubectl("get", "pod", "-n", a, "cri-pod", "-o", "jsonpath={.metadata.uid}").stdout.strip()
    plugin = os.path.join(lab.dir, "cni-bin", "tether")
    network = {"cniVersion": "1.0.0", "name": world.net, "type": "tether", "agent_socket": lab.cni_socket("h1")}
    ctrd = Containerd(tempfile.mkdtemp(prefix="tether-ctrd-"), plugin, network)  # short: socket paths
    cri = os.path.join(k8s_bin(), "cri-sandbox")
    try:
        ctrd.start()
        sb = ctrd.run_sandbox(cri, "cri-pod", a, uid)
        [add] = ctrd.calls()
        env, config = add["env"], add["config"]
        assert env["CNI_COMMAND"] == "ADD" and env["CNI_IFNAME"] == "eth0"
        assert env["CNI_NETNS"].startswith("/var/run/netns/cni-")
        args = cni_args(env["CNI_ARGS"])
        assert args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": a, "K8S_POD_NAME": "cri-pod",
                        "K8S_POD_INFRA_CONTAINER_ID": sb["sandbox"], "K8S_POD_UID": uid}
        assert env["CNI_CONTAINERID"] == sb["sandbox"] and len(sb["sandbox"]) == 64
        assert set(config) == {"cniVersion", "name", "type", "agent_socket"}  # no labels: they come from the API
        # the lab's stand-in for kubelet makes the same call: the same CNI_ARGS keys, the sandbox id twice
        lab_pod = lab.state.pods["h2/client"]
        lab_args = cni_args(lab_pod.cni_args)
        assert set(lab_args) == set(args)
        assert lab_args["K8S_POD_INFRA_CONTAINER_ID"] == lab_pod.container_id and len(lab_pod.container_id) == 64
        assert "labels" not in lab_pod.cni_config
        # a real pod: Tether's endpoint has the address containerd reports and the Pod's labels (controller)
        [ep] = [e for e in lab.client().list_raw("Endpoint") if e["owner"].get("container_id") == sb["sandbox"]]
        assert ep["ips"] == [sb["ip"]] and ep["host"] == "h1" and ep["name"] == "cri-pod"
        converge(lambda: world.endpoint_by_id(ep["id"])["labels"] == {"app": "cri"}, "the Pod's labels on it")
        netns = os.path.basename(env["CNI_NETNS"])
        assert nsx(netns, "ping", "-c", "1", "-W", "2", pods["c1"].ip, check=False).returncode == 0
        ctrd.remove_sandbox(cri, sb["sandbox"])
        dels = [c for c in ctrd.calls() if c["env"]["CNI_COMMAND"] == "DEL"]
        assert dels and cni_args(dels[0]["env"]["CNI_ARGS"]) == args  # DEL repeats ADD's arguments
        assert "prevResult" in dels[0]["config"]
        assert not [e for e in lab.client().list_raw("Endpoint") if e["id"] == ep["id"]]
    finally:
        ctrd.stop(cri)
        shutil.rmtree(ctrd.dir, ignore_errors=True)
        world.kube.kubectl("delete", "pod", "-n", a, "cri-pod", "--grace-period=0", "--force", check=False)


def test_deleting_a_node_reclaims_its_hosts_addresses(world: World, pods) -> None:
    lab = world.lab
    on_h2 = [e for e in lab.client().list_raw("Endpoint") if e["host"] == "h2"]
    ips = {ip for e in on_h2 for ip in e["ips"]}
    assert ips
    lab.kill_agent("h2")  # the machine is gone
    world.kube.kubectl("delete", "node", "h2")
    converge(lambda: "h2" not in {h.name for h in lab.client().list("Host")}, "the host of the deleted node to go")
    assert not [e for e in lab.client().list_raw("Endpoint") if e["host"] == "h2"]
    allocated = {ip for blk in lab.client().list_raw("Block") for ip in blk["allocations"]}
    assert not ips & allocated, "the deleted node's pod addresses are back in the pool"
