"""The NetworkPolicy truth tables (tests/policy) again, driven through a real kube-apiserver: the
namespaces, pods (labels, named ports), label changes and policies are `kubectl` writes, pods
start as kubelet calls CNI (no labels), and `tether kube` mirrors everything into Tether.

Each change waits until Tether holds it (so the expectation, computed from Tether's state by
`tether.policy_eval`, is the Kubernetes one), then the 9 pods on three hosts are probed on every
pair and port until the datapath agrees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import unique
from tests.policy.test_truth_tables import SCENARIOS
from tests.policy.truth import PORT_DECLS, Cluster, Pod, make_network
from tether.kube.translate import SOURCE_LABEL
from tether.lab.cluster import Lab, stop_pid, wait_for
from tether.lab.kube import KubeApi, node_manifest, run_kube_pod, start_controller

pytestmark = pytest.mark.lab


class KubeCluster(Cluster):
    def __init__(self, lab: Lab, kube: KubeApi, prefix: str, network: str) -> None:
        super().__init__(lab, prefix, network)
        self.kube = kube

    def create(self) -> None:
        for n in self.namespaces:
            self.kube.apply(json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": self.ns(n), "labels": {"ns": n}}}))
        for n in self.namespaces:
            wait_for(lambda n=n: self.client.get("Namespace", self.ns(n)).labels.get("ns") == n, 30,
                     f"namespace {n} in Tether")
        super().create()

    def add_pod(self, ns: str, name: str, host: str, labels: dict[str, str], network: str | None = None) -> Pod:
        import os
        import subprocess
        import sys

        pod_name = f"{self.prefix}{ns}{name}"
        ports = [{"name": p["name"], "containerPort": p["port"], "protocol": p["protocol"]} for p in PORT_DECLS]
        info = run_kube_pod(self.lab, self.kube, host, pod_name, network or self.network, namespace=self.ns(ns),
                            labels=labels, ports=ports)
        control = os.path.join(self.lab.dir, f"probe-{pod_name}.sock")
        proc = subprocess.Popen(["ip", "netns", "exec", info.ns, sys.executable, "-m", "tether.lab.probe", "serve",
                                 "--control", control], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        ep = next(e for e in self.client.list_raw("Endpoint", namespace=self.ns(ns)) if e["name"] == pod_name)
        pod = Pod(f"{ns}/{name}", self.ns(ns), host, f"{host}/{pod_name}", info.ip, ep["id"], control, proc.pid)
        self.pods[pod.key] = pod
        self._wait_labels(pod, labels)
        wait_for(lambda: len(self.client.get("Endpoint", pod.endpoint_id).ports) == len(PORT_DECLS), 30,
                 f"{pod.key}'s named ports")
        wait_for(lambda: os.path.exists(control), 15, f"the probe server of {pod.key}")
        return pod

    def _wait_labels(self, pod: Pod, labels: dict[str, str]) -> None:
        wait_for(lambda: self.client.get("Endpoint", pod.endpoint_id).labels == labels, 30,
                 f"{pod.key}'s labels {labels} in Tether")

    def remove_pod(self, key: str) -> None:
        import signal

        pod = self.pods[key]
        self.kube.kubectl("delete", "pod", "-n", pod.namespace, pod.ref.split("/")[1], "--wait=false")
        self.pods.pop(key)
        stop_pid(pod.pid, signal.SIGKILL, wait=2)
        self.lab.rm_pod(pod.ref)

    def policy(self, ns: str, name: str, spec: dict):  # type: ignore[override]
        self.kube.apply(json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                    "metadata": {"name": name, "namespace": self.ns(ns)}, "spec": spec}))
        served = json.loads(self.kube.kubectl("get", "networkpolicy", "-n", self.ns(ns), name, "-o", "json").stdout)
        key = f"{self.ns(ns)}/{name}"
        wait_for(lambda: self.client.get("NetworkPolicy", key).spec == served["spec"], 30, f"policy {key} in Tether")

    def clear_policies(self) -> None:
        for n in self.namespaces:
            self.kube.kubectl("delete", "networkpolicy", "--all", "-n", self.ns(n))
        wait_for(lambda: not [p for p in self.client.list_raw("NetworkPolicy")
                              if p["namespace"].startswith(self.prefix)], 30, "the policies to leave Tether")

    def label_pod(self, key: str, labels: dict[str, str]) -> None:
        pod = self.pods[key]
        patch = [{"op": "replace", "path": "/metadata/labels", "value": labels}]
        self.kube.kubectl("patch", "pod", "-n", pod.namespace, pod.ref.split("/")[1], "--type=json",
                          "-p", json.dumps(patch))
        self._wait_labels(pod, labels)

    def label_namespace(self, short: str, labels: dict[str, str]) -> None:
        name = self.ns(short)
        want = {**labels, "kubernetes.io/metadata.name": name}  # the apiserver always keeps this one
        patch = [{"op": "replace", "path": "/metadata/labels", "value": want}]
        self.kube.kubectl("patch", "namespace", name, "--type=json", "-p", json.dumps(patch))
        wait_for(lambda: self.client.get("Namespace", name).labels == {**want, SOURCE_LABEL: "kubernetes"}, 30,
                 f"namespace {name}'s labels in Tether")


@pytest.fixture(scope="module")
def cluster(lab: Lab, kube: KubeApi) -> Iterator[KubeCluster]:
    kube.apply(node_manifest(lab))
    controller = start_controller(lab, kube)
    c = KubeCluster(lab, kube, unique("k"), make_network(lab, unique("knp"), "10.64.0.0/16"))
    try:
        c.create()
        yield c
    finally:
        c.close()
        stop_pid(controller.pid)


@pytest.fixture
def clean(cluster: KubeCluster) -> Iterator[KubeCluster]:
    try:
        yield cluster
    finally:
        cluster.clear_policies()
        for key in list(cluster.pods):
            cluster.label_pod(key, {"pod": key.split("/")[1]})
        for n in ("x", "y", "z"):
            cluster.label_namespace(n, {"ns": n})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_truth_table_through_kubectl(clean: KubeCluster, name: str) -> None:
    SCENARIOS[name](clean)
    assert clean.converge() == []


def test_pod_and_namespace_label_changes_through_kubectl(clean: KubeCluster) -> None:
    c = clean
    c.policy("x", "p", {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                              {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]})
    assert c.converge() == []
    c.label_pod("x/c", {"pod": "b"})
    assert c.converge() == []
    c.label_namespace("y", {"ns": "y", "team": "blue"})
    assert c.converge() == []
