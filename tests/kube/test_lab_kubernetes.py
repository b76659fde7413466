"""`tether lab up --kubernetes --no-kubelet` through the real CLI (test_kubelet_lab.py runs it with its
kubelets): Nodes for the hosts, a pod run as kubelet would gets its labels from the apiserver, and
`lab down` stops every process it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.lab import lab_name, require_root_tools
from tether.lab.cluster import Lab, alive, wait_for

pytestmark = pytest.mark.lab


def tether(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True,
                          timeout=600)


def test_lab_up_kubernetes_runs_an_apiserver_and_the_controller_and_down_stops_them() -> None:
    require_root_tools()
    name = lab_name()
    pids: list[int] = []
    try:
        r = tether("lab", "up", "--name", name, "--hosts", "2", "--kubernetes", "--no-kubelet")
        assert r.returncode == 0, r.stdout + r.stderr
        lab = Lab(name)
        pids += lab.state.kube_pids
        assert len(pids) == 3 and all(alive(p) for p in pids)  # tether kube, kube-apiserver, etcd
        from tether.lab.kube import lab_kube_api

        kube = lab_kube_api(lab)
        nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)
        assert sorted(n["metadata"]["name"] for n in nodes["items"]) == ["h1", "h2"]
        r = tether("lab", "kube-pod", "web", "--host", "h2", "-n", "default", "--label", "app=web", "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: [e.labels for e in lab.client().list("Endpoint") if e.name == "web"] == [{"app": "web"}],
                 30, "the controller to give the pod's endpoint its labels")
    finally:
        tether("lab", "down", "--name", name)
    assert not any(alive(p) for p in pids)
    assert not os.path.exists(f"/run/tether-lab/{name}")
