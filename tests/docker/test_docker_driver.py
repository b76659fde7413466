"""Docker (Debian's docker.io) on Tether: two dockerd in two lab hosts share a Tether network through the
agent's libnetwork remote network and IPAM drivers; a CNI pod on a third host, NetworkPolicy, published
ports, --ip, docker rm, and restarts of dockerd and of the agent.

Set-up follows docs/RUNTIMES.md through `tether.lab.dockerd`: each dockerd runs inside its lab
host's namespace with its own data/exec roots and sees only its own agent's plugin socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import Lab, nsx, wait_for
from tether.lab.dockerd import IMAGE, Dockerd, available
from tether.model import Endpoint

pytestmark = [pytest.mark.lab, pytest.mark.client]

DNS_IP = "169.254.20.10"  # the agents' DNS address (tether.agent.dns)
BLUE, RED = "10.77.0.0/16", "10.78.0.0/16"


@dataclass
class Env:
    lab: Lab
    d: dict[str, Dockerd]
    blue: str
    red: str
    names: dict[str, str] = field(default_factory=dict)

    def run(self, host: str, name: str, *args: str, network: str | None = None, cmd: tuple[str, ...] = ()) -> str:
        """`docker run -d` on a host; returns the container's Tether address (from docker inspect)."""
        net = network or self.blue
        self.d[host].docker("run", "-d", "--name", name, "--network", net, "--dns", DNS_IP,
                            "--dns-search", f"{net}.tether.local", *args, IMAGE, *(cmd or ("sleep", "100000")))
        return self.ip(host, name, net)

    def ip(self, host: str, name: str, net: str | None = None) -> str:
        fmt = f"{{{{(index .NetworkSettings.Networks \"{net or self.blue}\").IPAddress}}}}"
        return self.d[host].docker("inspect", "-f", fmt, name).stdout.strip()

    def exec(self, host: str, name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.d[host].docker("exec", name, *cmd, check=False, timeout=timeout)

    def pings(self, host: str, name: str, target: str, within: float = 15) -> bool:
        """Ping until one answer or `within` seconds: routes reach other hosts a moment later."""
        deadline = time.monotonic() + within
        while True:
            if self.exec(host, name, "ping", "-c", "1", "-W", "1", target).returncode == 0:
                return True
            if time.monotonic() > deadline:
                return False

    def fetch(self, host: str, name: str, ip: str) -> str:
        """The page busybox httpd serves on ip:80, or "" (busybox-static's wget crashes on NSS: use nc)."""
        out = self.exec(host, name, "sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80").stdout
        head, sep, body = out.replace("\r", "").partition("\n\n")
        return body if sep and " 200 " in head else ""

    def endpoint(self, name: str, net: str | None = None, timeout: float = 20) -> Endpoint:
        """The Tether endpoint named after a container (it takes the name just after the start)."""
        found: list[Endpoint] = []

        def named() -> bool:
            found[:] = [e for e in self.lab.client().list("Endpoint", network=net or self.blue, name=name)]
            return bool(found)

        wait_for(named, timeout, f"the Tether endpoint of container {name}")
        return found[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    why = available()
    if why:
        pytest.skip(why)
    # agents hold their own host credentials: `docker network create` (a network labelled as Docker's)
    # and `-p` (a service published on the container's host only) are what the node authorizer allows
    lab = make_lab(hosts=3)
    d: dict[str, Dockerd] = {}
    root = tmp_path_factory.mktemp("docker")
    try:
        for h in ("h1", "h2"):
            d[h] = Dockerd(lab.host(h).ns, root / h, lab.docker_plugin_dir(h), lab.docker_socket(h))
            d[h].start()
            d[h].import_busybox()
        e = Env(lab, d, unique("blue"), unique("red"))
        d["h1"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", BLUE, e.blue)
        wait_for(lambda: e.blue in d["h2"].docker("network", "ls", "--format", "{{.Name}}").stdout, 30,
                 "the network created on h1 to appear in h2's dockerd")
        d["h1"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", RED, e.red)
        e.names = {k: unique(k) for k in ("a", "b", "c", "web", "client", "other", "st", "pub")}
        yield e
    finally:
        for x in d.values():
            x.cleanup()
        lab.down()


def test_docker_network_create_makes_one_tether_network_for_both_hosts(env: Env) -> None:
    nets = {n.name: n for n in env.lab.client().list("Network")}
    assert [s.cidr for s in nets[env.blue].subnets] == [BLUE]
    assert [s.cidr for s in nets[env.red].subnets] == [RED]
    bad = env.d["h2"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether",
                             "--subnet", "10.77.5.0/24", unique("clash"), check=False)
    assert bad.returncode != 0 and "overlaps" in bad.stderr and env.blue in bad.stderr, bad.stderr
    bad = env.d["h2"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "-o", "encap=direct",
                             "--subnet", BLUE, unique("clash"), check=False)
    assert bad.returncode != 0 and "other settings" in bad.stderr, bad.stderr


def test_containers_on_two_hosts_ping_each_other_by_ip(env: Env) -> None:
    a, b = env.names["a"], env.names["b"]
    ip_a = env.run("h1", a, "--label", "app=db")
    ip_b = env.run("h2", b)
    assert ip_a.startswith("10.77.") and ip_b.startswith("10.77.") and ip_a != ip_b
    ep = env.endpoint(a)
    assert ep.host == "h1" and ep.ips == [ip_a] and ep.owner.type == "docker" and ep.labels["app"] == "db"
    assert env.pings("h1", a, ip_b)
    assert env.pings("h2", b, ip_a)
    routes = env.exec("h1", a, "ip", "route").stdout
    assert "default via 169.254.1.1" in routes  # routed like a pod: no docker_gwbridge
    assert env.exec("h1", a, "ip", "-o", "link").stdout.count(": eth") == 1


def test_containers_resolve_each_other_by_name_through_tether_dns(env: Env) -> None:
    a, b = env.names["a"], env.names["b"]
    env.endpoint(b)
    fqdn = f"{b}.{env.blue}.tether.local"
    r = env.exec("h1", a, "nslookup", fqdn, DNS_IP)
    assert env.ip("h2", b) in r.stdout, r.stdout + r.stderr
    assert env.pings("h1", a, fqdn)
    assert env.pings("h1", a, b)  # the short name through the network's search domain


def test_container_on_another_network_cannot_reach_them(env: Env) -> None:
    c = env.names["c"]
    env.run("h1", c, network=env.red)
    ip_c = env.ip("h1", c, env.red)
    ip_a, ip_b = env.ip("h1", env.names["a"]), env.ip("h2", env.names["b"])
    assert ip_c.startswith("10.78.")
    assert not env.pings("h1", c, ip_a, within=2)
    assert not env.pings("h1", c, ip_b, within=2)
    assert not env.pings("h1", env.names["a"], ip_c, within=2)


def test_pod_made_through_cni_on_a_third_host_reaches_them(env: Env) -> None:
    pod = env.lab.run_pod("h3", unique("p"), env.blue)
    try:
        for host, name in (("h1", env.names["a"]), ("h2", env.names["b"])):
            assert env.lab.reaches(f"h3/{pod.name}", env.ip(host, name), within=15)
        assert env.pings("h1", env.names["a"], pod.ip)
    finally:
        env.lab.rm_pod(f"h3/{pod.name}")


def test_network_policy_applied_with_tether_apply_selects_docker_containers_by_label(env: Env, tmp_path) -> None:
    web, client, other = env.names["web"], env.names["client"], env.names["other"]
    ip_web = env.run("h1", web, "--label", "app=web", cmd=("httpd", "-f", "-p", "80", "-h", "/www"))
    env.run("h2", client, "--label", "role=client")
    env.run("h2", other)
    for n in (web, client, other):
        env.endpoint(n)
    url = ip_web
    wait_for(lambda: env.fetch("h2", other, url) == "hello from docker\n", 20, "web reachable before the policy")
    pol = unique("webpol")
    (tmp_path / "pol.yaml").write_text(f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {pol}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]
    ports: [{{protocol: TCP, port: 80}}]
""")
    cli = os.path.join(os.path.dirname(sys.executable), "tether")
    r = subprocess.run([cli, "apply", "-f", str(tmp_path / "pol.yaml")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TETHER_SERVER": env.lab.server_url, "TETHER_TOKEN": env.lab.token})
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: env.fetch("h2", other, url) == "", 20, "the policy to block the unlabelled container")
        assert env.fetch("h2", client, url) == "hello from docker\n"
        assert not env.pings("h2", client, ip_web, within=1)  # only TCP 80 is allowed
    finally:
        env.lab.client().delete("NetworkPolicy", f"default/{pol}")


def test_published_port_is_reachable_from_the_internet(env: Env) -> None:
    pub = env.names["pub"]
    env.run("h1", pub, "-p", "8080:80", cmd=("httpd", "-f", "-p", "80", "-h", "/www"))
    host_ip = env.lab.host("h1").ip
    curl = ("curl", "-s", "-m", "2", f"http://{host_ip}:8080/")

    def served() -> bool:
        return nsx(env.lab.inet, *curl, check=False).stdout == "hello from docker\n"

    wait_for(served, 20, f"port 8080 on {host_ip} from the internet namespace")
    # as Docker publishes: on the container's host only, so h2 may publish 8080 for its own container
    h2_ip = env.lab.host("h2").ip
    assert nsx(env.lab.inet, "curl", "-s", "-m", "2", f"http://{h2_ip}:8080/", check=False).stdout == ""
    pub2 = unique("pub2")
    env.run("h2", pub2, "-p", "8080:80", cmd=("httpd", "-f", "-p", "80", "-h", "/www"))
    wait_for(lambda: nsx(env.lab.inet, "curl", "-s", "-m", "2", f"http://{h2_ip}:8080/", check=False).stdout
             == "hello from docker\n", 20, f"port 8080 on {h2_ip} too")
    clash = env.d["h1"].docker("run", "-d", "--name", unique("clash"), "--network", env.blue, "-p", "8080:80", IMAGE,
                               "sleep", "100", check=False)
    assert clash.returncode != 0 and "8080" in clash.stderr and "already published" in clash.stderr, clash.stderr
    env.d["h2"].docker("rm", "-f", pub2)
    assert served()
    env.d["h1"].docker("rm", "-f", pub)
    wait_for(lambda: not any(s.name.startswith("docker-") for s in env.lab.client().list("Service")), 20,
             "the published port's service to go")
    assert nsx(env.lab.inet, *curl, check=False).stdout == ""


def test_static_ip_and_docker_rm_releases_the_address(env: Env) -> None:
    st = env.names["st"]
    static = "10.77.200.7"
    assert env.run("h2", st, "--ip", static) == static
    ep = env.endpoint(st)
    assert ep.ips == [static] and ep.host == "h2"
    assert any(static in b.allocations for b in env.lab.client().list("Block"))
    taken = env.d["h1"].docker("run", "-d", "--name", unique("dup"), "--network", env.blue, "--ip", static, IMAGE,
                               "sleep", "10", check=False)
    assert taken.returncode != 0 and static in taken.stderr, taken.stderr
    pinger = unique("pinger")
    env.run("h1", pinger)
    assert env.pings("h1", pinger, static)
    env.d["h2"].docker("rm", "-f", st)
    wait_for(lambda: not any(static in b.allocations for b in env.lab.client().list("Block")), 20,
             "docker rm to release the address in IPAM")
    assert not [e for e in env.lab.client().list("Endpoint", network=env.blue) if e.name == st]


def test_dockerd_restart_keeps_connectivity(env: Env) -> None:
    a, b = env.names["a"], env.names["b"]
    ip_a, ip_b = env.ip("h1", a), env.ip("h2", b)
    env.d["h1"].stop(remove_containers=False)  # --live-restore: containers keep running
    probe = env.lab.run_pod("h3", unique("p"), env.blue)
    try:
        assert env.lab.reaches(f"h3/{probe.name}", ip_a, within=10)
        env.d["h1"].start()
        assert env.pings("h1", a, ip_b)
        assert env.pings("h2", b, ip_a)
        n = unique("after")
        ip_n = env.run("h1", n)
        assert env.pings("h2", b, ip_n)
        env.d["h1"].docker("rm", "-f", n)
        wait_for(lambda: not any(ip_n in bl.allocations for bl in env.lab.client().list("Block")), 20,
                 "rm after a dockerd restart to release the address")
    finally:
        env.lab.rm_pod(f"h3/{probe.name}")


def test_agent_restart_is_fast_and_removes_the_stale_socket(env: Env) -> None:
    sock = os.path.join(env.lab.docker_plugin_dir("h1"), "tether.sock")
    # an address released just before the crash, which the replica on disk (written at most once a
    # second) has not caught up with: the restarted agent's replica still gives it to the removed
    # container, while the server hands it to the next one
    gone = unique("gone")
    ip_gone = env.run("h1", gone)
    # the disk copy is a base and a log of the events since (agent/replica_file.py): `gone` is in either
    files = [os.path.join(env.lab.agent_dir("h1"), name) for name in ("replica.json", "replica.log")]

    def saved() -> list[str]:
        return [open(p).read() if os.path.exists(p) else "" for p in files]

    wait_for(lambda: any(f'"{ip_gone}"' in t for t in saved()), 30, "the agent to save a replica holding `gone`")
    stale = saved()
    env.d["h1"].docker("rm", "-f", gone)
    env.lab.kill_agent("h1", signal.SIGKILL)
    for p, text in zip(files, stale, strict=True):
        with open(p, "w") as f:
            f.write(text)
    assert os.path.exists(sock)  # left behind by the killed agent
    t0 = time.monotonic()
    env.lab.start_agent("h1", wait=False)
    n = unique("fast")
    ip_n = env.run("h1", n)  # blocks until the plugin answers
    took = time.monotonic() - t0
    assert took < 10, f"docker run after an agent restart took {took:.1f}s"
    assert env.endpoint(n).ips == [ip_n]
    if ip_n != ip_gone:
        print(f"note: the new container got {ip_n}, not the released {ip_gone}")
    assert env.pings("h2", env.names["b"], ip_n)
    assert env.pings("h1", env.names["a"], env.ip("h2", env.names["b"]))
    env.lab.wait_agent("h1")


def test_dual_stack_containers_on_two_hosts_ping_each_other_over_ipv6(env: Env) -> None:
    """`docker network create --ipv6` with an IPv4 and an IPv6 subnet: each container gets both
    addresses from Tether (the same endpoint), a default route via fe80::1 (the host side answers
    for it) and reaches the other host's container over IPv6."""
    net = unique("dual")
    for h in ("h1", "h2"):
        env.d[h].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--ipv6",
                        "--subnet", "10.79.0.0/16", "--subnet", "fd79::/64", net)
    a, b = unique("d6a"), unique("d6b")
    env.run("h1", a, network=net)
    env.run("h2", b, network=net)
    fmt = f"{{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}"
    a6, b6 = (env.d[h].docker("inspect", "-f", fmt, n).stdout.strip() for h, n in (("h1", a), ("h2", b)))
    assert a6.startswith("fd79::") and b6.startswith("fd79::") and a6 != b6
    ep = env.endpoint(a, net)
    assert sorted(ep.ips, key=lambda ip: ":" in ip)[1] == a6 and len(ep.ips) == 2
    assert "default via fe80::1" in env.exec("h1", a, "ip", "-6", "route").stdout
    assert env.pings("h1", a, b6)
    assert env.pings("h2", b, a6)
