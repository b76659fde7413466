"""Live pod traffic through etcd and server faults, at the issue's size: a 3-host lab whose server
and a second server (both on the underlay, in the ctl namespace) use a 3-member etcd cluster, and
whose agents know both servers (`--server A,B`). Under an 8-client write storm an etcd follower is
killed and restarted, the etcd leader is killed, and then the server the agents are attached to
(the lab's) is killed by PID, so every agent must fail over to the second server. The established
TCP flow between pods never breaks, no acknowledged write is lost, no address is given twice, every
host stays alive, and the agents converge: a pod started once the faults are over is reachable from
the other hosts within 5 s. TETHER_FAULT_SECONDS is the length of each phase (default 2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.faults.storm import Storm, check
from tests.faults.streams import tcp_stream
from tests.fixtures.etcd import etcd_leader, free_port
from tests.fixtures.lab import make_lab, unique
from tether.client import TetherClient
from tether.lab.cluster import wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
PHASE = float(os.environ.get("TETHER_FAULT_SECONDS", "2"))
SECOND_IP = "198.18.0.251"  # the second server's underlay address, beside the lab server's in the ctl namespace



def start_second_server(lab, store: str, d: str) -> tuple[subprocess.Popen, str]:
    """A second `tether server` on the same etcd: HTTPS on SECOND_IP:7443 in the lab's ctl namespace
    (its certificate signed by the lab server through the store) and plain HTTP on loopback."""
    subprocess.run(["ip", "-n", lab.ctl, "addr", "add", f"{SECOND_IP}/24", "dev", "eth0"], check=True, timeout=30)
    os.makedirs(d)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.lab.netns_listen", lab.ctl, f"{SECOND_IP}:7443", "--",
         sys.executable, "-m", "tether.server.main", "--store", store, "--state-dir", d,
         "--listen", f"127.0.0.1:{port}", "--listen", "fd://{fd}", "--tls-san", SECOND_IP, "--gc-interval", "10"],
        stdout=open(f"{d}/server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 60, "the second server")
    return proc, url


def test_etcd_member_leader_and_attached_server_kill_break_no_pod_flow_and_lose_no_write(etcd_cluster, tmp_path):
    store = "etcd://" + ",".join(m.endpoint for m in etcd_cluster)
    lab = make_lab(hosts=3, store=store)
    second: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        second, second_url = start_second_server(lab, store, str(tmp_path / "s2"))
        for h in ("h1", "h2", "h3"):  # the lab's server first: the agents attach to it
            lab.kill_agent(h, signal.SIGTERM)
            lab.start_agent(h, servers=[lab.underlay_url, f"https://{SECOND_IP}:7443"])
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.45.0.0/16")], encap="vxlan"))
        a = lab.run_pod("h1", "a", net)
        b = lab.run_pod("h3", "b", net)
        assert lab.reaches("h1/a", b.ip)
        seconds = 5 * PHASE + 20
        stream = tcp_stream(lab, a, b, "h3/b", 5002, seconds, procs)
        storm_net = unique("s")
        lab.client().create_network(Network(name=storm_net, subnets=[Subnet(cidr="10.46.0.0/16")]))
        with Storm([lab.server_url, second_url], lab.token, storm_net) as storm:
            time.sleep(PHASE)
            leader = etcd_leader(etcd_cluster)
            follower = next(m for m in etcd_cluster if m is not leader)
            follower.stop(signal.SIGKILL)
            time.sleep(PHASE)
            follower.start()
            follower.wait_ready(30)
            etcd_leader(etcd_cluster).stop(signal.SIGKILL)
            time.sleep(PHASE)
            lab.stop_server(signal.SIGKILL)  # the server every agent is attached to
            time.sleep(PHASE)
        faults_over = time.monotonic()
        c = lab.run_pod("h2", "c", net)  # its endpoint is written through the second server
        assert lab.reaches("h1/a", c.ip, within=5), "h1's agent did not converge within 5 s of the faults"
        assert lab.reaches("h3/b", c.ip, within=5), "h3's agent did not converge within 5 s of the faults"
        converged = time.monotonic() - faults_over
        out, _ = stream.communicate(timeout=seconds + 30)
        api = TetherClient(second_url, lab.token)
        eps = [e for e in api.list_raw("Endpoint") if e["network"] == storm_net]
        dead = sorted(h["name"] for h in api.request("GET", "/api/v1/hosts") if not h["alive"])
        counts = {**check(storm.books, eps), "broken_flows": int(stream.returncode != 0),
                  "hosts_shown_dead": dead, "converged_s": round(converged, 2),
                  "test_s": round(time.monotonic() - started, 1)}
        print("\nlab fault storm:", json.dumps(counts))
        assert stream.returncode == 0, out
        assert not counts["lost"] and not counts["resurrected"] and not counts["duplicates"], counts
        assert not counts["unknown"] and not counts["refused"], counts
        assert not dead, f"hosts shown dead after their server was killed: {dead}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if second is not None and second.poll() is None:  # the second server: its session
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
        lab.down()
