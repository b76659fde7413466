"""A network partition between the server and etcd: the server's only way to etcd crosses a veth
between two namespaces of the test's own, and the test blackholes it with an nftables drop table
inside one of them (never on the root namespace's interfaces).

    lab server (root ns) --tcp 127.0.0.1--> socat --unix socket--> socat in ns <p>-path
        --veth 198.19.250.2 -> 198.19.250.1--> etcd in ns <p>-etcd

During the partition the server answers 503 (Retry-After) and /healthz is unhealthy with the
reason, while pod traffic between lab hosts goes on (an established TCP stream never breaks); once
the partition heals the server is healthy again, takes writes, and the agents converge: a pod
started afterwards is reachable within 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.fixtures.etcd import free_port
from tests.fixtures.lab import make_lab, require_root_tools, unique
from tether.lab.cluster import wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
PARTITION = float(os.environ.get("TETHER_PARTITION_SECONDS", "15"))
STREAM = os.path.join(os.path.dirname(__file__), "..", "lab", "tcp_stream.py")
ETCD_IP, PATH_IP = "198.19.250.1", "198.19.250.2"  # only inside the two namespaces below
DROP_ALL = """table inet tether_partition {
  chain in { type filter hook input priority -300; policy drop; }
  chain out { type filter hook output priority -300; policy drop; }
}
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclass
class PartitionedEtcd:
    """etcd in its own namespace, reached from the root namespace's loopback through a path that can
    be cut (`cut()`: drop every packet in the path namespace; `heal()`: remove the drop)."""

    etcd_ns: str
    path_ns: str
    dir: str
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.etcd_ns)
        sh("ip", "netns", "add", self.path_ns)
        sh("ip", "-n", self.etcd_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
           self.path_ns)
        for ns, ip in ((self.etcd_ns, ETCD_IP), (self.path_ns, PATH_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.etcd_ns, "etcd", "--name", "p", "--data-dir", os.path.join(self.dir, "etcd"),
             "--listen-client-urls", f"http://{ETCD_IP}:2379", "--advertise-client-urls", f"http://{ETCD_IP}:2379",
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "p=http://127.0.0.1:2380", "--logger", "zap", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, ETCD_UNSUPPORTED_ARCH=""),
            start_new_session=True))
        sock = os.path.join(self.dir, "etcd.sock")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.path_ns, "socat", f"UNIX-LISTEN:{sock},fork", f"TCP:{ETCD_IP}:2379"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: os.path.exists(sock), 10, "the relay in the path namespace")
        self.procs.append(subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: subprocess.run(["etcdctl", "--endpoints", f"127.0.0.1:{self.port}", "endpoint", "health"],
                                        capture_output=True, env=dict(os.environ, ETCDCTL_API="3"),
                                        timeout=10).returncode == 0, 30, "etcd through the relay")

    def cut(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.path_ns, "nft", "-f", "-"], input=DROP_ALL.encode(), check=True,
                       capture_output=True, timeout=30)

    def heal(self) -> None:
        sh("ip", "netns", "exec", self.path_ns, "nft", "delete", "table", "inet", "tether_partition")

    def down(self) -> None:
        for p in reversed(self.procs):  # each started in a session of its own: its socat children go too
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in (self.path_ns, self.etcd_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def partitioned_etcd() -> Iterator[PartitionedEtcd]:
    require_root_tools()
    d = tempfile.mkdtemp(prefix="tether-partition-")
    p = PartitionedEtcd(unique("pe"), unique("pp"), d)
    try:
        p.up()
        yield p
    finally:
        p.down()
        subprocess.run(["rm", "-rf", d], check=False)


def popen_in(ns: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_a_server_cut_off_from_etcd_answers_503_keeps_pod_traffic_and_recovers(partitioned_etcd) -> None:
    lab = make_lab(hosts=2, store=partitioned_etcd.url)
    procs: list[subprocess.Popen] = []
    try:
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.47.0.0/16")], encap="vxlan"))
        a = lab.run_pod("h1", "a", net)
        b = lab.run_pod("h2", "b", net)
        assert lab.reaches("h1/a", b.ip)
        procs.append(popen_in(b.ns, sys.executable, STREAM, "serve", "5003"))
        wait_for(lambda: ":5003" in lab.exec("h2/b", "ss", "-Hltn").stdout, 10, "the stream server")
        seconds = PARTITION + 40
        stream = popen_in(a.ns, sys.executable, STREAM, "send", b.ip, "5003", str(seconds))
        procs.append(stream)
        auth = {"Authorization": f"Bearer {lab.token}"}
        with httpx.Client(base_url=lab.server_url, headers=auth, timeout=60) as api:
            assert api.get("/healthz").status_code == 200

            partitioned_etcd.cut()
            cut_at = time.monotonic()
            listed = api.get("/api/v1/networks")
            assert listed.status_code == 503, listed.text
            assert listed.headers.get("retry-after") == "1"
            first_503 = time.monotonic() - cut_at
            health = api.get("/healthz")
            assert health.status_code == 503 and health.json()["ok"] is False, health.text
            assert any("etcd" in p for p in health.json()["problems"]), health.text
            assert lab.reaches("h1/a", b.ip, within=5), "pod traffic stopped during the partition"
            time.sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
            assert stream.poll() is None, "the pod TCP stream ended during the partition"

            partitioned_etcd.heal()
            healed_at = time.monotonic()
            wait_for(lambda: api.get("/healthz").status_code == 200, 30, "the server healthy after the partition")
            healthy_s = time.monotonic() - healed_at
            assert api.get("/api/v1/networks").status_code == 200
        c = lab.run_pod("h2", "c", net)
        assert lab.reaches("h1/a", c.ip, within=5), "the agents did not converge within 5 s after healing"
        converged_s = time.monotonic() - healed_at
        out, _ = stream.communicate(timeout=seconds + 30)
        print("\npartition:", json.dumps({"partition_s": PARTITION, "first_503_s": round(first_503, 2),
                                          "healthy_after_heal_s": round(healthy_s, 2),
                                          "new_pod_reachable_after_heal_s": round(converged_s, 2),
                                          "broken_flows": int(stream.returncode != 0)}))
        assert stream.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        lab.down()
