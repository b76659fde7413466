"""Kubernetes path vs Tether's own API: from a pod's creation to its policy enforced and its
Service backend programmed on every lab host.

    .venv/bin/python -m bench.kube [--pods 20]

A 2-host lab, a real kube-apiserver (tools/k8s) and `tether kube`. In each namespace a
NetworkPolicy admits only `role=allowed` to `app=bench` pods, and a Service balances over them.
- `kube`: the Pod is created in the apiserver (bound to h1), CNI ADD runs as kubelet calls it (no
  labels; the CNI config names a kubeconfig, so the agent reads them at ADD, unless
  --no-labels-at-add), and the pod's address is added to the Service's EndpointSlice (what the EndpointSlice
  controller does); the controller mirrors labels and backends into Tether.
- `tether`: CNI ADD with the labels in the CNI config, the Service selects by label in Tether.
Done when (1) a prober pod on h2 without `role=allowed` no longer gets a TCP reset from the new pod
(its SYN is dropped: the policy selects it) and (2) the Service's nft map on every host holds the
pod's address. Target: kube p50/p99 at most 2x tether's, p99 under 1 s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

from tether.lab.cluster import Lab, nsx, wait_for
from tether.lab.kube import KubeApi, host_kubeconfig, node_manifest, pod_manifest, start_controller, start_kube
from tether.model import Network, NetworkPolicy, Service, ServicePort, Subnet

PROBE_PORT = 9  # nothing listens: a reset means the SYN got through, silence means the policy dropped it
SVC_PORT = 80

# Reads an address per line; probes it with TCP connects (30 ms timeout) until one is dropped; prints
# CLOCK_MONOTONIC of that moment (shared with the driver).
PROBER = r"""
import socket, sys, time
print("ready", flush=True)
for line in sys.stdin:
    ip = line.strip(); deadline = time.monotonic() + 20; when = None
    while time.monotonic() < deadline:
        s = socket.socket(); s.settimeout(0.03)
        try:
            s.connect((ip, 9))
        except ConnectionRefusedError:
            time.sleep(0.005)
        except OSError:
            when = time.monotonic(); break
        finally:
            s.close()
    print(when, flush=True)
"""


def backend_ips(lab: Lab, host: str, vip: str) -> set[str]:
    out = nsx(lab.host(host).ns, "nft", "-j", "list", "map", "inet", "tether", "svc_backend_ip", check=False).stdout
    found = set()
    for item in json.loads(out or '{"nftables": []}')["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            if key["concat"][0] == vip:
                found.add(value)
    return found


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))] * 1000, 1)


def policy_spec() -> dict:
    return {"podSelector": {"matchLabels": {"app": "bench"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}]}]}


def measure(lab: Lab, prober: subprocess.Popen, vip: str, make_pod, n: int) -> list[float]:
    lat = []
    for i in range(n):
        t0 = time.monotonic()
        ip = make_pod(i)
        assert prober.stdin and prober.stdout
        prober.stdin.write(ip + "\n")
        prober.stdin.flush()
        wait_for(lambda ip=ip: all(ip in backend_ips(lab, h.name, vip) for h in lab.state.hosts), 20,
                 f"{ip} as a backend on every host")
        programmed = time.monotonic()
        dropped = prober.stdout.readline().strip()
        if dropped == "None":
            raise RuntimeError(f"the policy never selected pod {ip}")
        lat.append(max(programmed, float(dropped)) - t0)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--labels-at-add", action=argparse.BooleanOptionalAction, default=True,
                    help="the CNI config names a kubeconfig, so the agent reads the pod's labels at ADD (otherwise "
                         "only tether kube brings them)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    lab = Lab(f"bk{os.getpid() % 10000}")
    tmp = tempfile.mkdtemp(prefix="tether-bench-kube-")
    kube: KubeApi | None = None
    controller = prober = None
    try:
        lab.up(hosts=2, progress=lambda _m: None)
        kube = start_kube(tmp)
        c = lab.client()
        c.create_network(Network(name="pods", subnets=[Subnet(cidr="10.63.0.0/16")]))
        kube.apply(node_manifest(lab))
        controller = start_controller(lab, kube)
        # the tether path: its own namespace, policy and selector Service
        probe_pod = lab.run_pod("h2", "probe", "pods", namespace="bt", labels={"role": "other"})
        c.apply(NetworkPolicy(name="bench", namespace="bt", spec=policy_spec()))
        svc_t = c.apply(Service(name="bench", namespace="bt", selector={"app": "bench"},
                                ports=[ServicePort(port=SVC_PORT, target_port=8080)]))
        # the kube path: the same through the apiserver (the prober's namespace is made by CNI in Tether;
        # the probe pod stays in "bt": only its address matters, and it carries no role=allowed)
        kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: bk}\n")
        kube.apply(json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                               "metadata": {"name": "bench", "namespace": "bk"}, "spec": policy_spec()}))
        kube.apply(json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "bk"},
                               "spec": {"ports": [{"name": "http", "port": SVC_PORT, "targetPort": 8080}]}}))
        vip_k = kube.kubectl("get", "svc", "-n", "bk", "bench", "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        wait_for(lambda: "bk/bench" in {f"{s.namespace}/{s.name}" for s in c.list("Service")}, 30,
                 "the controller to mirror the Service")
        prober = subprocess.Popen(["ip", "netns", "exec", probe_pod.ns, sys.executable, "-c", PROBER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert prober.stdout and prober.stdout.readline().strip() == "ready"

        from kubernetes import client as kc
        from kubernetes import config as kconf

        api = kconf.new_client_from_config(config_file=kube.kubeconfig)
        cni_kube = {"kubernetes": {"kubeconfig": host_kubeconfig(lab, kube)}} if a.labels_at_add else None
        core, disc = kc.CoreV1Api(api), kc.DiscoveryV1Api(api)
        addresses: list[str] = []

        def kube_pod(i: int) -> str:
            name = f"k{i}"
            core.create_namespaced_pod("bk", json.loads(pod_manifest(name, "bk", "h1", {"app": "bench"})))
            uid = core.read_namespaced_pod(name, "bk").metadata.uid
            p = lab.run_pod("h1", name, "pods", namespace="bk",
                            cni_args=f"K8S_POD_INFRA_CONTAINER_ID={uid.replace('-', '')}{i:032x};K8S_POD_UID={uid}",
                            cni_config=cni_kube)
            addresses.append(p.ip)
            body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                    "metadata": {"name": "bench-1", "namespace": "bk",
                                 "labels": {"kubernetes.io/service-name": "bench",
                                            "endpointslice.kubernetes.io/managed-by": "bench.tether.dev"}},
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in addresses]}
            if len(addresses) == 1:
                disc.create_namespaced_endpoint_slice("bk", body)
            else:
                disc.replace_namespaced_endpoint_slice("bench-1", "bk", {
                    **body, "metadata": {**body["metadata"],
                                         "resourceVersion": disc.read_namespaced_endpoint_slice(
                                             "bench-1", "bk").metadata.resource_version}})
            return p.ip

        def tether_pod(i: int) -> str:
            return lab.run_pod("h1", f"t{i}", "pods", namespace="bt", labels={"app": "bench"}).ip

        results = {}
        # interleave the two paths in halves, so drift on the shared machine hits both alike
        # one pod each first, not counted: the first ADD that reads the apiserver pays for importing its client
        measure(lab, prober, svc_t.cluster_ip, lambda i: tether_pod(900), 1)
        measure(lab, prober, vip_k, lambda i: kube_pod(900), 1)
        half = max(1, a.pods // 2)
        lat_t = measure(lab, prober, svc_t.cluster_ip, tether_pod, half)
        lat_k = measure(lab, prober, vip_k, kube_pod, half)
        lat_t += measure(lab, prober, svc_t.cluster_ip, lambda i: tether_pod(i + half), a.pods - half)
        lat_k += measure(lab, prober, vip_k, lambda i: kube_pod(i + half), a.pods - half)
        for tag, lat in (("tether_api", lat_t), ("kubernetes", lat_k)):
            results[tag] = {"pods": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                            "max_ms": round(max(lat) * 1000, 1)}
        k, t = results["kubernetes"], results["tether_api"]
        results["ratio_p50"] = round(k["p50_ms"] / t["p50_ms"], 2)
        results["ratio_p99"] = round(k["p99_ms"] / t["p99_ms"], 2)
        results["labels_at_add"] = a.labels_at_add
        results["target"] = "kubernetes p50 and p99 at most 2x tether_api, p99 under 1000 ms"
        results["met"] = results["ratio_p50"] <= 2 and results["ratio_p99"] <= 2 and k["p99_ms"] < 1000
        print(json.dumps(results, indent=1))
    finally:
        if prober is not None:
            prober.kill()
        if controller is not None:
            controller.terminate()
            controller.wait(10)
        if kube is not None:
            kube.stop()
        lab.down()


if __name__ == "__main__":
    main()
