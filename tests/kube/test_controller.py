"""`tether kube` against a real kube-apiserver and a real Tether server (no lab): mirroring of
namespaces and policies, Tether's own objects left alone, and leader election through a Lease."""

from __future__ import annotations

import json
import os
import signal

from tests.fixtures.server import start_server
from tether.kube.translate import SOURCE_LABEL
from tether.lab.cluster import wait_for
from tether.lab.kube import KubeApi, spawn_controller
from tether.model import Namespace, NetworkPolicy


def writes(path: str) -> int:
    try:
        with open(path) as f:
            return len(json.load(f)["written"])
    except (OSError, ValueError):
        return 0


def test_one_leader_writes_and_another_takes_over_when_it_dies(kube: KubeApi, tmp_path) -> None:
    srv = start_server(f"sqlite://{tmp_path}/t.db", str(tmp_path / "server"))
    procs = {}
    try:
        c = srv.client()
        c.apply(Namespace(name="own", labels={"mine": "yes"}))  # Tether's own: never touched
        c.apply(NetworkPolicy(name="own", namespace="own", spec={"podSelector": {}}))
        stats = {i: str(tmp_path / f"{i}.json") for i in ("a", "b")}
        for i in ("a", "b"):
            procs[i] = spawn_controller(kube, srv.url, os.path.join(srv.state_dir, "token"),
                                        str(tmp_path / f"{i}.log"), stats[i], identity=f"ctl-{i}", lease_duration=3)
        kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ka, labels: {team: a}}\n---\n"
                   "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: ka}\n"
                   "spec: {podSelector: {}}\n")
        wait_for(lambda: {"ka/deny"} <= {f"{p.namespace}/{p.name}" for p in c.list("NetworkPolicy")}, 60,
                 "the policy to be mirrored")
        assert c.get("Namespace", "ka").labels["team"] == "a"
        holder = kube.kubectl("get", "lease", "-n", "kube-system", "tether-kube",
                              "-o", "jsonpath={.spec.holderIdentity}").stdout
        leader, other = ("a", "b") if holder == "ctl-a" else ("b", "a")
        assert writes(stats[leader]) >= 2 and writes(stats[other]) == 0
        os.kill(procs[leader].pid, signal.SIGKILL)
        procs[leader].wait()
        kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: kb, labels: {team: b}}\n")
        wait_for(lambda: "kb" in {n.name for n in c.list("Namespace")}, 30, "the other controller to take over")
        assert kube.kubectl("get", "lease", "-n", "kube-system", "tether-kube",
                            "-o", "jsonpath={.spec.holderIdentity}").stdout == f"ctl-{other}"
        own = c.get("Namespace", "own").labels
        assert own["mine"] == "yes" and SOURCE_LABEL not in own
        assert "own/own" in {f"{p.namespace}/{p.name}" for p in c.list("NetworkPolicy")}
        kube.kubectl("delete", "networkpolicy", "-n", "ka", "deny")
        wait_for(lambda: "ka/deny" not in {f"{p.namespace}/{p.name}" for p in c.list("NetworkPolicy")}, 30,
                 "a deleted policy to go")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        srv.stop()
