"""Live pod traffic through etcd faults: a 2-host lab whose server (and a second one) use a 3-member
etcd cluster; under an 8-client write storm, an etcd follower, the etcd leader and the second
server are killed by PID. The established TCP flow between pods never breaks, no acknowledged write
is lost, no address is given twice, and the agents converge: a pod started once the faults are over
is reachable within 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.storm import Storm, check
from tests.fixtures.etcd import etcd_leader
from tests.fixtures.lab import make_lab, unique
from tests.fixtures.server import start_server
from tether.lab.cluster import wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
PHASE = float(os.environ.get("TETHER_FAULT_SECONDS", "2"))
STREAM = os.path.join(os.path.dirname(__file__), "..", "lab", "tcp_stream.py")


def popen_in(ns: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_etcd_member_and_leader_kill_break_no_pod_flow_and_lose_no_write(etcd_cluster, tmp_path):
    lab = make_lab(hosts=2, store="etcd://" + ",".join(m.endpoint for m in etcd_cluster))
    second = None
    procs: list[subprocess.Popen] = []
    try:
        second = start_server(lab.state.store, str(tmp_path / "s2"))
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.45.0.0/16")], encap="vxlan"))
        a = lab.run_pod("h1", "a", net)
        b = lab.run_pod("h2", "b", net)
        assert lab.reaches("h1/a", b.ip)
        procs.append(popen_in(b.ns, sys.executable, STREAM, "serve", "5002"))
        wait_for(lambda: ":5002" in lab.exec("h2/b", "ss", "-Hltn").stdout, 10, "the stream server")
        seconds = 5 * PHASE + 20
        stream = popen_in(a.ns, sys.executable, STREAM, "send", b.ip, "5002", str(seconds))
        procs.append(stream)
        storm_net = unique("s")
        lab.client().create_network(Network(name=storm_net, subnets=[Subnet(cidr="10.46.0.0/16")]))
        with Storm([lab.server_url, second.url], lab.token, storm_net) as storm:
            time.sleep(PHASE)
            leader = etcd_leader(etcd_cluster)
            follower = next(m for m in etcd_cluster if m is not leader)
            follower.stop(signal.SIGKILL)
            time.sleep(PHASE)
            follower.start()
            follower.wait_ready(30)
            etcd_leader(etcd_cluster).stop(signal.SIGKILL)
            time.sleep(PHASE)
            second.kill()
            time.sleep(PHASE)
        faults_over = time.monotonic()
        c = lab.run_pod("h2", "c", net)
        assert lab.reaches("h1/a", c.ip, within=5), "the agents did not converge within 5 s of the faults"
        converged = time.monotonic() - faults_over
        out, _ = stream.communicate(timeout=seconds + 30)
        eps = [e for e in lab.client().list_raw("Endpoint") if e["network"] == storm_net]
        counts = {**check(storm.books, eps), "broken_flows": int(stream.returncode != 0),
                  "converged_s": round(converged, 2)}
        print("\nlab fault storm:", json.dumps(counts))
        assert stream.returncode == 0, out
        assert not counts["lost"] and not counts["resurrected"] and not counts["duplicates"], counts
        assert not counts["unknown"] and not counts["refused"], counts
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if second is not None:
            second.stop()
        lab.down()
