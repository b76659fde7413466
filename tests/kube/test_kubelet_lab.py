"""Real kubelets: `tether lab up --kubernetes` gives every lab host a private containerd and a
kubelet (its Node), Tether as their CNI. Pods are written with `kubectl apply`, bound to two hosts
(`spec.nodeName`: no scheduler), run by kubelet through containerd's CRI plugin, which calls
Tether's CNI plugin; probes run in the network namespaces containerd made for them.

One lab with kubelets for the module (kubelet per host is the heavy part); the tests run in order.
kubelet is built by tools/k8s/build.sh --kubelet (scripts/install-deps starts it in the background;
the fixture waits for that build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import lab_name, require_root_tools, unique
from tests.services.probes import connect_many, start_server, stop
from tether.lab.cluster import Lab, PodInfo, alive, nsx, wait_for
from tether.lab.containerd import Containerd, node_dir
from tether.lab.kube import KubeApi, kubelet_bin, kubelet_pod, kubelet_pod_manifest, lab_kube_api

pytestmark = pytest.mark.lab
PORT = 8080


def tether(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def klab() -> Iterator[tuple[Lab, KubeApi]]:
    """`tether lab up --kubernetes` through the CLI: kubelets are its default."""
    require_root_tools()
    kubelet_bin()  # first: a build still under way (scripts/install-deps) is waited for before any lab exists
    name = lab_name()
    try:
        r = tether("lab", "up", "--name", name, "--hosts", "2", "--kubernetes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "kubelet on h2: node Ready" in r.stderr, r.stderr
        lab = Lab(name)
        yield lab, lab_kube_api(lab)
    finally:
        tether("lab", "down", "--name", name)


@pytest.fixture(scope="module")
def pods(klab) -> Iterator[dict]:
    """Namespace `ns`: web (app=web, serving on PORT) on h1; client (role=client) and other
    (role=other) on h2; all applied at once, then each waited for."""
    lab, kube = klab
    ns = unique("kl")
    kube.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n")
    specs = {"web": ("h1", {"app": "web"}, [{"name": "http", "containerPort": PORT}]),
             "client": ("h2", {"role": "client"}, None), "other": ("h2", {"role": "other"}, None)}
    kube.apply("\n---\n".join(kubelet_pod_manifest(n, ns, h, labels, ports) for n, (h, labels, ports) in specs.items()))
    out: dict = {"ns": ns}
    for n, (h, labels, ports) in specs.items():
        out[n] = kubelet_pod(lab, kube, h, n, ns, labels, ports)
    # the CLI's way, through h1's kubelet too
    r = tether("lab", "kube-pod", "cli", "--host", "h1", "-n", ns, "--label", "role=client", "--name", lab.name)
    assert r.returncode == 0 and r.stdout.startswith(f"{ns}/cli on h1: 10.244."), r.stdout + r.stderr
    server = start_server(out["web"].ns, "web", PORT)
    try:
        wait_for(lambda: f":{PORT}" in nsx(out["web"].ns, "ss", "-ltn").stdout, 10, "the web pod's server")
        yield out
    finally:
        stop(server)


def endpoints(lab: Lab, name: str) -> list[dict]:
    return [e for e in lab.client().list_raw("Endpoint") if e["name"] == name]


def reaches(src: PodInfo, ip: str, port: int = PORT) -> bool:
    return connect_many(src.ns, ip, port, 1, timeout=20)["failures"] == 0


def cni_calls(lab: Lab, host: str) -> list[dict]:
    return Containerd(os.path.join(node_dir(lab.dir, host), "containerd"), "", {}).calls()


def test_kubelets_register_their_lab_hosts_as_ready_nodes_on_containerd(klab) -> None:
    _lab, kube = klab
    nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["h1", "h2"]
    for n in nodes:
        ready = [c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready == ["True"], n["status"]["conditions"]
        assert n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
        assert n["status"]["nodeInfo"]["kubeletVersion"] == "v1.37.2"


def test_pods_kubelet_runs_on_two_hosts_are_networked_by_tether_and_reach_each_other(klab, pods) -> None:
    lab, kube = klab
    for name in ("web", "client", "other"):
        pod = pods[name]
        status = json.loads(kube.kubectl("get", "pod", "-n", pods["ns"], name, "-o", "json").stdout)["status"]
        wait_for(lambda pod=pod: [e["labels"] for e in endpoints(lab, pod.name)] == [pod.labels], 30,
                 f"{name}'s labels on its endpoint")
        [ep] = endpoints(lab, name)
        assert ep["ips"] == [status["podIP"]] == pod.ips and ep["host"] == pod.host, (ep, status)
        # containerd (driven by kubelet) made the call, with kubelet's pod arguments
        [add] = [c for c in cni_calls(lab, pod.host) if c["env"]["CNI_CONTAINERID"] == pod.container_id]
        assert add["env"]["CNI_COMMAND"] == "ADD" and f"K8S_POD_NAME={name}" in add["env"]["CNI_ARGS"]
    web = pods["web"]
    assert reaches(pods["client"], web.ip) and reaches(pods["other"], web.ip)  # h2 -> h1, no policy: open
    r = nsx(web.ns, "ping", "-c", "1", "-W", "2", pods["other"].ip, check=False)  # h1 -> h2
    assert r.returncode == 0, r.stdout + r.stderr


def test_network_policy_applied_with_kubectl_isolates_the_web_pod(klab, pods) -> None:
    _lab, kube = klab
    web = pods["web"]
    kube.apply(f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-in, namespace: {pods['ns']}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]
    ports: [{{port: http}}]
""")
    wait_for(lambda: not reaches(pods["other"], web.ip), 30, "the policy to refuse role=other")
    assert reaches(pods["client"], web.ip), "role=client is allowed"
    assert not reaches(pods["other"], web.ip)


def test_kubectl_delete_pod_makes_kubelet_release_its_address_through_cni_del(klab, pods) -> None:
    lab, kube = klab
    other = pods["other"]
    kube.kubectl("delete", "pod", "-n", pods["ns"], "other", "--timeout=60s")
    wait_for(lambda: not endpoints(lab, "other"), 30, "the endpoint to go with the pod")
    calls = [c["env"]["CNI_COMMAND"] for c in cni_calls(lab, "h2") if c["env"]["CNI_CONTAINERID"] == other.container_id]
    assert calls[0] == "ADD" and "DEL" in calls[1:], calls
    assert not any(other.ip in e["ips"] for e in lab.client().list_raw("Endpoint"))
    wait_for(lambda: not os.path.exists(f"/run/netns/{other.ns}"), 30, "containerd to remove the pod's netns")
    # the address is free: a new pod on h2 may get it, and reaches the web pod's port only as allowed
    again = kubelet_pod(lab, kube, "h2", "again", pods["ns"], {"role": "client"})
    assert again.ip and reaches(again, pods["web"].ip)


def test_lab_down_stops_kubelets_containerds_and_their_pods(klab, pods) -> None:
    lab, _kube = klab
    pids = [json.load(open(os.path.join(node_dir(lab.dir, h), "pids.json"))) for h in ("h1", "h2")]
    netns = [p.ns for p in (pods["web"], pods["client"])]
    shims = [p for h in ("h1", "h2") for p in Containerd(os.path.join(node_dir(lab.dir, h), "containerd"), "",
                                                          {}).shim_pids()]
    assert shims and all(alive(p) for p in shims)
    t0 = time.time()
    r = tether("lab", "down", "--name", lab.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() - t0 < 60
    assert not any(alive(p) for ps in pids for p in ps.values()), pids
    assert not any(alive(p) for p in shims)
    assert not any(os.path.exists(f"/run/netns/{n}") for n in netns)
    with open("/proc/self/mounts") as f:
        assert lab.dir not in f.read()
    logs = [f"/var/log/pods/{pods['ns']}_{n}_" for n in ("web", "client", "other")]
    assert not [d for d in os.listdir("/var/log/pods") if any(f"/var/log/pods/{d}".startswith(p) for p in logs)]
