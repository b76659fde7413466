"""`kill -9` of an agent with traffic running: the datapath keeps forwarding, the restarted agent
adopts what it finds and changes nothing; CNI ADD during the outage says "try again later"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import Lab, wait_for
from tether.lab.inspect import kernel_state
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
STREAM = os.path.join(os.path.dirname(__file__), "tcp_stream.py")


def popen_in(ns: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_agent_kill9_and_restart_keeps_traffic_and_changes_nothing(fresh_lab: Lab) -> None:
    lab = fresh_lab
    net = unique("n")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.41.0.0/16")], encap="vxlan"))
    a = lab.run_pod("h1", "a", net)
    b = lab.run_pod("h2", "b", net)
    assert lab.reaches("h1/a", b.ip)
    time.sleep(0.5)
    before = {h: kernel_state(lab.host(h).ns) for h in ("h1", "h2")}
    assert before["h1"]["links"] and before["h1"]["routes"] and before["h1"]["fdb"] and before["h1"]["nft"]

    server = popen_in(b.ns, sys.executable, STREAM, "serve", "5001")
    wait_for(lambda: ":5001" in lab.exec("h2/b", "ss", "-Hltn").stdout, 10, "the stream server")
    stream = popen_in(a.ns, sys.executable, STREAM, "send", b.ip, "5001", "8")
    ping = popen_in(a.ns, "ping", "-i", "0.05", "-w", "8", b.ip)
    try:
        time.sleep(1.5)
        lab.kill_agent("h1")  # SIGKILL
        lab.kill_agent("h2")

        # while the agent is down, CNI ADD is refused with "try again later" and leaves nothing
        cid = f"{lab.name}-h1-late"
        subprocess.run(["ip", "netns", "add", cid], check=True)
        try:
            cfg = {"cniVersion": "1.0.0", "name": net, "type": "tether"}
            code, out = lab.cni("h1", "ADD", cfg, container_id=cid, netns=f"/var/run/netns/{cid}",
                                args="K8S_POD_NAME=late;K8S_POD_NAMESPACE=default")
            assert code != 0
            err = json.loads(out)
            assert err["code"] == 11
            assert "agent" in err["msg"] and ("again" in err["msg"] or "running" in err["msg"])
            time.sleep(1.0)
            lab.start_agent("h1")
            lab.start_agent("h2")
            # the same ADD works after the restart
            code, out = lab.cni("h1", "ADD", cfg, container_id=cid, netns=f"/var/run/netns/{cid}",
                                args="K8S_POD_NAME=late;K8S_POD_NAMESPACE=default")
            assert code == 0, out
            code, out = lab.cni("h1", "DEL", cfg, container_id=cid, netns=f"/var/run/netns/{cid}")
            assert code == 0, out
        finally:
            subprocess.run(["ip", "netns", "del", cid], check=False)

        stream_out, _ = stream.communicate(timeout=30)
        ping_out, _ = ping.communicate(timeout=30)
    finally:
        for p in (stream, ping, server):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert stream.returncode == 0, stream_out
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
    assert m, ping_out
    sent, received = int(m.group(1)), int(m.group(2))
    assert sent - received <= 1, ping_out

    time.sleep(1.0)  # let the restarted agents finish any (expected: no) work
    after = {h: kernel_state(lab.host(h).ns) for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        for part in before[h]:
            assert after[h][part] == before[h][part], f"{h} {part} changed across the agent restart"
    log = open(os.path.join(lab.agent_dir("h1"), "agent.log")).read().split("agent h1 up")[-1]
    assert "table replaced" not in log


@pytest.fixture
def two_hosts() -> Iterator[Lab]:
    lab = make_lab(hosts=2)
    try:
        yield lab
    finally:
        lab.down()


def test_an_agent_restarted_among_1000_endpoints_is_programmed_within_5s_from_its_disk_copy(two_hosts: Lab) -> None:
    """Issue 29 at a tenth of its size (bench/agent_scale.py runs the full one): 1,000 endpoints on
    10 hosts registered through the API, 100 policies, 50 services. The restarted agent replays the
    watch from its copy on disk (no list of every object), reports the revision written while it
    was down within 5 s of its start, and the TCP stream through its host never breaks."""
    from bench.agent_scale import measure

    result = measure(two_hosts, endpoints=1000, fake_hosts=10, restarts=1, kill=False)
    restart = result["restarts"][0]
    assert restart["stream_ok"], restart["stream"]
    assert restart["programmed_s"] <= 5.0, result
    assert result["agent_rss_mb"] <= 120, result
    log = open(os.path.join(two_hosts.agent_dir("h1"), "agent.log")).read().split("agent h1 up")[-1]
    assert "from the copy on disk" in log and "synced at revision" not in log, \
        "the restarted agent listed every object instead of resuming from its disk copy"
