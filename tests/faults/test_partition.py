"""A network partition between the server and etcd: the server's only way to etcd crosses a veth
between two namespaces of the test's own, and the test blackholes it with an nftables drop table
inside one of them (never on the root namespace's interfaces).

    lab server (root ns) --tcp 127.0.0.1--> socat --unix socket--> socat in ns <pe>p0
        --veth 198.19.250.2 -> 198.19.250.1--> etcd in ns <pe>

During the partition the server answers 503 (Retry-After) and /healthz is unhealthy with the
reason, while pod traffic between lab hosts goes on (an established TCP stream never breaks); once
the partition heals the server is healthy again, takes writes, and the agents converge: a pod
started afterwards is reachable within 5 s.
"""

from __future__ import annotations

import contextlib
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

from tests.faults.streams import tcp_stream
from tests.fixtures.etcd import free_port
from tests.fixtures.lab import make_lab, require_root_tools, unique
from tether.lab.cluster import wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab
PARTITION = float(os.environ.get("TETHER_PARTITION_SECONDS", "15"))
NET = "198.19.250"  # path i: etcd's side .4i+1/30, the path namespace's .4i+2/30; only inside namespaces below
DROP_ALL = """table inet tether_partition {
  chain in { type filter hook input priority -300; policy drop; }
  chain out { type filter hook output priority -300; policy drop; }
}
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclass
class PartitionedEtcd:
    """etcd in its own namespace, reached from the root namespace's loopback through paths (one
    namespace each, a veth to etcd's) that can be cut one by one: `cut(i)` drops every packet in
    path i's namespace, `heal(i)` removes the drop. `urls[i]` is the store URL through path i."""

    etcd_ns: str
    dir: str
    paths: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def up(self) -> None:
        sh("ip", "netns", "add", self.etcd_ns)
        sh("ip", "-n", self.etcd_ns, "link", "set", "lo", "up")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.etcd_ns, "etcd", "--name", "p", "--data-dir", os.path.join(self.dir, "etcd"),
             "--listen-client-urls", "http://0.0.0.0:2379", "--advertise-client-urls", f"http://{NET}.1:2379",
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "p=http://127.0.0.1:2380", "--logger", "zap", "--log-level", "error"],
            stdout=open(os.path.join(self.dir, "etcd.log"), "ab"), stderr=subprocess.STDOUT,
            env=dict(os.environ, ETCD_UNSUPPORTED_ARCH=""), start_new_session=True))
        self.add_path()

    def add_path(self) -> str:
        i = len(self.paths)
        ns = f"{self.etcd_ns}p{i}"
        etcd_ip, path_ip = f"{NET}.{4 * i + 1}", f"{NET}.{4 * i + 2}"
        sh("ip", "netns", "add", ns)
        self.paths.append(ns)
        sh("ip", "-n", self.etcd_ns, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.etcd_ns, "addr", "add", f"{etcd_ip}/30", "dev", f"p{i}")
        sh("ip", "-n", self.etcd_ns, "link", "set", f"p{i}", "up")
        sh("ip", "-n", ns, "addr", "add", f"{path_ip}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        log = open(os.path.join(self.dir, f"relay{i}.log"), "ab")
        sock, port = os.path.join(self.dir, f"etcd{i}.sock"), free_port()
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "socat", f"UNIX-LISTEN:{sock},fork", f"TCP:{etcd_ip}:2379"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: os.path.exists(sock), 10, "the relay in the path namespace")
        self.procs.append(subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: subprocess.run(["etcdctl", "--endpoints", f"127.0.0.1:{port}", "endpoint", "health"],
                                        capture_output=True, env=dict(os.environ, ETCDCTL_API="3"),
                                        timeout=10).returncode == 0, 30, "etcd through the relay")
        self.urls.append(f"etcd://127.0.0.1:{port}")
        return self.urls[-1]

    def cut(self, i: int = 0) -> None:
        subprocess.run(["ip", "netns", "exec", self.paths[i], "nft", "-f", "-"], input=DROP_ALL.encode(),
                       check=True, capture_output=True, timeout=30)

    def heal(self, i: int = 0) -> None:
        sh("ip", "netns", "exec", self.paths[i], "nft", "delete", "table", "inet", "tether_partition")

    def down(self) -> None:
        for p in reversed(self.procs):  # each started in a session of its own: its socat children go too
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in (*self.paths, self.etcd_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def partitioned_etcd() -> Iterator[PartitionedEtcd]:
    require_root_tools()
    d = tempfile.mkdtemp(prefix="tether-partition-")
    p = PartitionedEtcd(unique("pe"), d)
    try:
        p.up()
        yield p
    finally:
        p.down()
        subprocess.run(["rm", "-rf", d], check=False)



def test_a_server_cut_off_from_etcd_answers_503_keeps_pod_traffic_and_recovers(partitioned_etcd) -> None:
    lab = make_lab(hosts=2, store=partitioned_etcd.urls[0])
    procs: list[subprocess.Popen] = []
    try:
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.47.0.0/16")], encap="vxlan"))
        a = lab.run_pod("h1", "a", net)
        b = lab.run_pod("h2", "b", net)
        assert lab.reaches("h1/a", b.ip)
        # long enough for the checks during the partition (store timeouts of 5 s each) and after it;
        # the test waits for the stream's end, so not longer
        seconds = PARTITION + 45
        stream = tcp_stream(lab, a, b, "h2/b", 5003, seconds, procs)
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
            status_at = time.monotonic()
            status = subprocess.run([sys.executable, "-m", "tether.cli.main", "status", "--server", lab.server_url,
                                     "--token", lab.token], capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "COLUMNS": "400"})
            assert "store: CANNOT TAKE WRITES: no etcd quorum" in status.stdout, status.stdout + status.stderr
            status_s = time.monotonic() - status_at
            assert lab.reaches("h1/a", b.ip, within=5), "pod traffic stopped during the partition"
            time.sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
            assert stream.poll() is None, "the pod TCP stream ended during the partition"

            partitioned_etcd.heal()
            healed_at = time.monotonic()
            wait_for(lambda: api.get("/healthz").status_code == 200, 30, "the server healthy after the partition")
            healthy_s = time.monotonic() - healed_at
            # a new etcd client gets fresh connections, not the stuck ones of the partition and their
            # reconnect backoff (shared gRPC subchannels: 5-30+ s here, and `tether status` 55 s)
            assert healthy_s < 3, f"healthy only {healthy_s:.1f} s after the partition healed"
            assert api.get("/api/v1/networks").status_code == 200
        c = lab.run_pod("h2", "c", net)
        assert lab.reaches("h1/a", c.ip, within=5), "the agents did not converge within 5 s after healing"
        converged_s = time.monotonic() - healed_at
        out, _ = stream.communicate(timeout=seconds + 30)
        print("\npartition:", json.dumps({"partition_s": PARTITION, "first_503_s": round(first_503, 2),
                                          "tether_status_s": round(status_s, 2),
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


SECOND_IP = "198.18.0.251"  # a second server's underlay address, beside the lab server's in the ctl namespace


def test_agents_of_a_server_cut_off_from_etcd_move_to_another_server_and_keep_adding_pods(
        partitioned_etcd, tmp_path) -> None:
    """Two servers, each with its own path to etcd; the agents know both. Cutting the first server's
    path: its API answers 503, the agents' calls and watches move to the second server, a pod added
    during the partition gets its address and is reachable from the other host, and the flow that
    was running never breaks."""
    lab = make_lab(hosts=2, store=partitioned_etcd.urls[0])
    procs: list[subprocess.Popen] = []
    stack = contextlib.ExitStack()
    try:
        second_store = partitioned_etcd.add_path()
        sh("ip", "-n", lab.ctl, "addr", "add", f"{SECOND_IP}/24", "dev", "eth0")
        d2 = str(tmp_path / "s2")
        os.makedirs(d2)
        second = subprocess.Popen(
            [sys.executable, "-m", "tether.lab.netns_listen", lab.ctl, f"{SECOND_IP}:7443", "--",
             sys.executable, "-m", "tether.server.main", "--store", second_store, "--state-dir", d2,
             "--listen", f"unix://{d2}/server.sock", "--listen", "fd://{fd}", "--tls-san", SECOND_IP],
            stdout=open(f"{d2}/server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(second)
        second_api = stack.enter_context(httpx.Client(
            transport=httpx.HTTPTransport(uds=f"{d2}/server.sock"), base_url="http://s2",
            headers={"Authorization": f"Bearer {lab.token}"}, timeout=60))
        wait_for(lambda: os.path.exists(f"{d2}/server.sock") and second_api.get("/healthz").status_code == 200,
                 60, "the second server (its certificate signed by the lab server through the store)")
        for h in ("h1", "h2"):
            lab.kill_agent(h, signal.SIGTERM)
            lab.start_agent(h, servers=[lab.underlay_url, f"https://{SECOND_IP}:7443"])
        net = unique("n")
        lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.48.0.0/16")], encap="vxlan"))
        a = lab.run_pod("h1", "a", net)
        b = lab.run_pod("h2", "b", net)
        assert lab.reaches("h1/a", b.ip)
        seconds = 45  # the pod added during the partition is reachable within ~7 s (60 at worst, below)
        stream = tcp_stream(lab, a, b, "h2/b", 5004, seconds, procs)

        partitioned_etcd.cut(0)
        cut_at = time.monotonic()
        with httpx.Client(base_url=lab.server_url, headers={"Authorization": f"Bearer {lab.token}"},
                          timeout=60) as first_api:
            assert first_api.get("/api/v1/networks").status_code == 503
        assert second_api.get("/healthz").status_code == 200
        c = lab.run_pod("h2", "c", net)  # the CNI ADD's endpoint is written through the second server
        assert c.ip
        added_s = time.monotonic() - cut_at
        assert lab.reaches("h1/a", c.ip, within=60), "h1's agent never learned of the pod added during the partition"
        reachable_s = time.monotonic() - cut_at
        assert stream.poll() is None, "the pod TCP stream ended during the partition"
        partitioned_etcd.heal(0)
        wait_for(lambda: httpx.get(lab.server_url + "/healthz", timeout=30).status_code == 200, 30,
                 "the first server healthy again")
        out, _ = stream.communicate(timeout=seconds + 30)
        print("\npartition with two servers:", json.dumps({
            "pod_added_after_cut_s": round(added_s, 2), "pod_reachable_from_other_host_after_cut_s":
            round(reachable_s, 2), "broken_flows": int(stream.returncode != 0)}))
        assert stream.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                if p.args[2] == "tether.lab.netns_listen":  # the second server: its session
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()
        stack.close()
        lab.down()
