"""Issue 23: an agent given several servers (`--server a,b`) keeps working when the one it talks to
is killed: its requests and its watch move to the other server (resuming from the last revision,
no new snapshot), its host stays alive, and pods on it are added and reached as before."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.client import TetherClient
from tether.lab.cluster import API_PORT, CTL_IP, Lab, free_port, stop_pid, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


@pytest.fixture
def etcd_lab() -> Iterator[Lab]:
    lab = make_lab(hosts=2, store="etcd")
    try:
        yield lab
    finally:
        lab.down()


def second_server(lab: Lab) -> tuple[subprocess.Popen, str, str]:
    """Another server over the lab's etcd, with the first one's admin token and CA (copied, as an
    operator shares them), HTTPS on the underlay at :API_PORT+1. Returns (process, underlay URL, loopback URL)."""
    state = os.path.join(lab.dir, "server2")
    os.makedirs(state, mode=0o700)
    for f in ("token", "ca.crt", "ca.key"):
        shutil.copy(os.path.join(lab.dir, "server", f), os.path.join(state, f))
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "tether.lab.netns_listen", lab.ctl, f"{CTL_IP}:{API_PORT + 1}", "--",
                          sys.executable, "-m", "tether.server.main", "--store", f"etcd://127.0.0.1:{lab._etcd_port}",
                          "--state-dir", state, "--listen", f"127.0.0.1:{port}", "--listen", "fd://{fd}",
                          "--tls-san", CTL_IP, "--gc-interval", "0"],
                         stdout=open(os.path.join(lab.dir, "server2.log"), "ab"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    loopback = f"http://127.0.0.1:{port}"
    wait_for(lambda: TetherClient(loopback, lab.token).list("Host") is not None, 20, "the second server")
    return p, f"https://{CTL_IP}:{API_PORT + 1}", loopback


def snapshots(lab: Lab, host: str) -> int:
    with open(os.path.join(lab.agent_dir(host), "agent.log")) as f:
        return f.read().count("synced at revision")


def test_agents_fail_over_to_the_other_server_without_a_resync(etcd_lab: Lab) -> None:
    lab = etcd_lab
    second, underlay2, loopback2 = second_server(lab)
    try:
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.48.0.0/16")]))
        for h in ("h1", "h2"):
            lab.kill_agent(h, signal.SIGTERM)
            lab.start_agent(h, servers=[lab.underlay_url, underlay2])
        a = lab.run_pod("h1", unique("a"), net)
        before = {h: snapshots(lab, h) for h in ("h1", "h2")}
        lab.stop_server(signal.SIGKILL)
        b = lab.run_pod("h2", unique("b"), net)  # CNI ADD on h2: its endpoint is created through server 2
        assert lab.reaches(a.name, b.ip, within=15), "h1 did not learn h2's new pod through the other server"
        c = lab.run_pod("h1", unique("c"), net)
        assert lab.reaches(b.name, c.ip, within=15)
        time.sleep(16)  # past the heartbeat TTL (15 s): only heartbeats through server 2 keep the hosts alive
        admin2 = TetherClient(loopback2, lab.token)
        hosts = {h["name"]: h["alive"] for h in admin2.list_raw("Host")}
        assert hosts == {"h1": True, "h2": True}
        assert {h: snapshots(lab, h) for h in ("h1", "h2")} == before  # the watch resumed, no full resync
    finally:
        stop_pid(second.pid)
