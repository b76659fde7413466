"""A virtual Tether cluster on one machine: hosts are network namespaces on a shared underlay.

```
ns <p>-ul   : bridge ul0 = the underlay switch and router (198.18.0.254, 198.18.1.254, 198.19.255.254)
ns <p>-h<i> : eth0 198.18.<s>.<i>, an agent process; pods' host ends
ns <p>-inet : eth0 198.19.255.1, a web server that echoes the caller's address and a DNS resolver
ns <p>-ctl  : eth0 198.18.0.250, where the server's HTTPS listener (:7443) sits on the underlay
```
The underlay also carries IPv6, one on-link prefix for everyone (`UNDERLAY6`): host 198.18.<s>.<i>
has fd00:198:18::<s>:<i>, the internet fd00:198:18::ff:1 (IPv6 node ports, IPv6 from outside);
the agents still use the IPv4 underlay for tunnels and the API.
`up(underlay="ipv6")` builds hosts with only IPv6 underlay addresses instead (no IPv4 on their eth0):
host <s>.<i> has fd00:198:19:<s>::<i>/64 (`UNDERLAY6_ONLY`, one /64 per underlay subnet, routed by
the switch namespace at fd00:198:19:<s>::fe), the agents register that address, tunnel and route
over it, and reach the server at [fd00:198:19::fa]:7443 (the ctl namespace's listener is then
dual-stack).
The server process runs in the root namespace with three listeners: HTTPS on 198.18.0.250:7443 in
the ctl namespace (bound there by `tether.lab.netns_listen`), which the agents use over the underlay
as real hosts would; a unix socket in the lab directory; and plain HTTP on a loopback port for the
CLI and the tests (admin token). Each agent joins at first start with a bootstrap token and the CA
pin, and keeps its own host credential in its state dir (`agent_auth="admin"` gives agents the admin
token instead, for tests of calls beyond the node authorizer). Nothing is added to the root namespace's
interfaces.
All state lives in `/run/tether-lab/<name>/state.json`, so any later command can find, change or
tear down the lab; processes are stopped by PID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

LAB_ROOT = "/run/tether-lab"
LOG_ROOT = "/tmp/tether-lab-logs"
INET_IP = "198.19.255.1"
INET_NET = "198.19.255"
UNDERLAY = "198.18"
UNDERLAY6 = "fd00:198:18::"  # /64 on the underlay switch, see underlay6()
INET_IP6 = "fd00:198:18::ff:1"
CTL_IP = "198.18.0.250"  # the server's underlay address (in the ctl namespace)
UNDERLAY6_ONLY = "fd00:198:19"  # IPv6-only underlay hosts: fd00:198:19:<s>::<i>/64, see up(underlay=)
CTL_IP6 = f"{UNDERLAY6_ONLY}::fa"  # the server's address on an IPv6-only underlay
API_PORT = 7443
CNI_VERSION = "1.0.0"
MAX_HOSTS = 200  # host addresses 198.18.<s>.1-200: below the ctl (.250) and gateway (.254) addresses
# `up(lean=True)` (`tether lab up --lean`): agents without what a scale host does not need, to keep
# memory per host small: no flow records (conntrack events) and no DNS server (no DNS records for
# every endpoint of the cluster); the datapath, policy, services and status reports are all there
LEAN_AGENT_ARGS = ["--flows", "off", "--dns-ip", "off"]


def sh(*args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def nsx(ns: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def stop_pid(pid: int | None, sig: int = signal.SIGTERM, wait: float = 10) -> None:
    if not alive(pid):
        return
    assert pid is not None
    os.kill(pid, sig)
    deadline = time.time() + wait
    while time.time() < deadline and alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


@dataclass
class HostInfo:
    name: str
    ns: str
    ip: str
    cidr: str
    agent_pid: int | None = None


@dataclass
class PodInfo:
    name: str
    host: str
    ns: str
    network: str
    namespace: str
    container_id: str
    ips: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    cni_args: str = ""  # the CNI_ARGS of ADD, passed again at DEL (as kubelet's runtime does)
    cni_config: dict[str, Any] = field(default_factory=dict)  # the extra CNI config keys of ADD, likewise

    @property
    def ip(self) -> str:
        return self.ips[0]


@dataclass
class LabState:
    name: str
    hosts: list[HostInfo] = field(default_factory=list)
    pods: dict[str, PodInfo] = field(default_factory=dict)
    store: str = "sqlite"
    server_pid: int | None = None
    server_port: int = 0
    etcd_pid: int | None = None
    inet_pids: list[int] = field(default_factory=list)
    server_args: list[str] = field(default_factory=list)
    agent_auth: str = "host"  # "host": each agent joins and holds its own credential; "admin": the admin token
    underlay: str = "ipv4"  # the hosts' underlay addresses: "ipv4" (plus the shared IPv6 prefix) or "ipv6" only
    bootstrap_token: str = ""
    ca_hash: str = ""
    kube_pids: list[int] = field(default_factory=list)  # `--kubernetes`: tether kube, kube-apiserver, its etcd
    agent_args: list[str] = field(default_factory=list)  # more agent flags (LEAN_AGENT_ARGS), kept for restarts


class CniFailure(Exception):
    def __init__(self, code: int, msg: str, raw: str) -> None:
        super().__init__(f"CNI error {code}: {msg}")
        self.code = code
        self.msg = msg
        self.raw = raw


class Lab:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = os.path.join(LAB_ROOT, name)
        self.state = LabState(name)
        if os.path.exists(self.state_path):
            self.load()

    # --- state ------------------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.dir, "state.json")

    def load(self) -> None:
        with open(self.state_path) as f:
            d = json.load(f)
        self.state = LabState(name=d["name"], hosts=[HostInfo(**h) for h in d["hosts"]],
                              pods={k: PodInfo(**v) for k, v in d["pods"].items()}, store=d["store"],
                              server_pid=d["server_pid"], server_port=d["server_port"], etcd_pid=d.get("etcd_pid"),
                              inet_pids=d.get("inet_pids", []), server_args=d.get("server_args", []),
                              agent_auth=d.get("agent_auth", "admin"), bootstrap_token=d.get("bootstrap_token", ""),
                              ca_hash=d.get("ca_hash", ""), kube_pids=d.get("kube_pids", []),
                              agent_args=d.get("agent_args", []))

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self.state), f, indent=1)
        os.replace(tmp, self.state_path)

    @property
    def ul(self) -> str:
        return f"{self.name}-ul"

    @property
    def inet(self) -> str:
        return f"{self.name}-inet"

    @property
    def server_socket(self) -> str:
        return os.path.join(self.dir, "server.sock")

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.state.server_port}"

    @property
    def ctl(self) -> str:
        return f"{self.name}-ctl"

    @property
    def underlay_url(self) -> str:
        """The server as the hosts reach it: HTTPS over the underlay."""
        if self.state.underlay == "ipv6":
            return f"https://[{CTL_IP6}]:{API_PORT}"
        return f"https://{CTL_IP}:{API_PORT}"

    @property
    def ca_file(self) -> str:
        return os.path.join(self.dir, "server", "ca.crt")

    def credential(self, host: str) -> str:
        """The host's own credential, as its agent keeps it."""
        with open(os.path.join(self.agent_dir(host), "credential")) as f:
            return f.read().strip()

    @property
    def token(self) -> str:
        with open(os.path.join(self.dir, "server", "token")) as f:
            return f.read().strip()

    def host(self, name: str) -> HostInfo:
        for h in self.state.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in lab {self.name} (hosts: {', '.join(h.name for h in self.state.hosts)})")

    def client(self):
        from tether.client import TetherClient

        return TetherClient(self.server_url, self.token)

    # --- building ---------------------------------------------------------------------------------

    def up(self, hosts: int = 3, store: str = "sqlite", across_subnets: bool = True, progress=print,
           server_args: list[str] | None = None, agent_auth: str = "host", underlay: str = "ipv4",
           lean: bool = False, start_wave: int = 10) -> None:
        """Build everything; `server_args` are extra `tether server` flags (e.g. shorter GC graces);
        `agent_auth` "host" (each agent joins for its own credential) or "admin" (the admin token);
        `underlay` "ipv4" or "ipv6" (hosts with only IPv6 underlay addresses, see the module's doc);
        `lean`: agents with LEAN_AGENT_ARGS. Agents start `start_wave` at a time, each wave ready
        before the next, so a hundred Python agents do not import, join and plan all at once on two
        cores (each join times out after a few seconds), and progress is reported per wave."""
        check_hosts(hosts)
        if agent_auth not in ("host", "admin"):
            raise ValueError(f"agent_auth {agent_auth!r}: 'host' or 'admin'")
        if underlay not in ("ipv4", "ipv6"):
            raise ValueError(f"underlay {underlay!r}: 'ipv4' or 'ipv6'")
        if os.path.exists(self.state_path) and self.state.hosts:
            raise RuntimeError(f"lab {self.name} already exists; `tether lab down --lab {self.name}` first")
        neighbour_room(hosts, progress)
        os.makedirs(self.dir, exist_ok=True)
        self.state = LabState(self.name, store=store, server_args=list(server_args or []), agent_auth=agent_auth,
                              underlay=underlay, agent_args=list(LEAN_AGENT_ARGS) if lean else [])
        self.save()
        try:
            progress(f"underlay switch {self.ul}")
            self._underlay()
            for i in range(1, hosts + 1):
                subnet = 1 if across_subnets and i >= 3 else 0
                h = HostInfo(f"h{i}", f"{self.name}-h{i}", f"{UNDERLAY}.{subnet}.{i}", f"{UNDERLAY}.{subnet}.0/24")
                if underlay == "ipv6":
                    net = ipaddress.ip_network(f"{UNDERLAY6_ONLY}:{subnet}::/64")  # written as the kernel does
                    h.ip, h.cidr = str(net.network_address + i), str(net)
                if hosts <= 20 or i % 10 == 0 or i == hosts:  # a line per host is too many past 20
                    progress(f"host {h.name} ({h.ip})" + (f" [{i}/{hosts}]" if hosts > 20 else ""))
                self._host(h, i)
                self.state.hosts.append(h)
                self.save()
            progress(f"internet {self.inet} ({INET_IP}: web :80, DNS :53)")
            self._internet()
            progress(f"server ({store} store, https://{CTL_IP}:{API_PORT} on the underlay)")
            self._plug(self.ctl, "pctl", f"{CTL_IP}/24", f"{UNDERLAY}.0.254")
            if underlay == "ipv6":
                nsx(self.ctl, "ip", "addr", "add", f"{CTL_IP6}/64", "dev", "eth0", "nodad")
                nsx(self.ctl, "ip", "-6", "route", "add", "default", "via", f"{UNDERLAY6_ONLY}::fe")
            self.start_server()
            if agent_auth == "host":
                out = self.client().request("POST", "/api/v1/bootstrap-tokens",
                                            json={"ttl": 7200, "description": f"lab {self.name}"})
                self.state.bootstrap_token, self.state.ca_hash = out["token"], out["ca_hash"]
                self.save()
            from tether.cni import install

            install(os.path.join(self.dir, "cni-bin"))
            self.start_agents(progress, max(1, start_wave))
            self.save()
        except BaseException:
            self.save()
            raise

    def start_agents(self, progress, wave: int = 10, timeout: float | None = None) -> None:
        """Start every host's agent, `wave` at a time, each wave ready before the next (each agent
        within `timeout` seconds; default 30 s + 0.5 s per host)."""
        t0 = time.monotonic()
        hosts = self.state.hosts
        for first in range(0, len(hosts), wave):
            batch = hosts[first:first + wave]
            for h in batch:
                if len(hosts) <= 20:
                    progress(f"agent on {h.name}")
                self.start_agent(h.name, wait=False)
            for h in batch:  # later waves wait longer: each agent reads a bigger cluster
                self.wait_agent(h.name, timeout=timeout or 30 + len(hosts) * 0.5)
            if len(hosts) > 20:
                progress(f"agents ready: {first + len(batch)}/{len(hosts)} ({time.monotonic() - t0:.0f} s)")

    def _underlay(self) -> None:
        sh("ip", "netns", "add", self.ul)
        nsx(self.ul, "ip", "link", "set", "lo", "up")
        nsx(self.ul, "ip", "link", "add", "ul0", "type", "bridge")
        nsx(self.ul, "ip", "link", "set", "ul0", "up")
        for a in (f"{UNDERLAY}.0.254/24", f"{UNDERLAY}.1.254/24", f"{INET_NET}.254/24"):
            nsx(self.ul, "ip", "addr", "add", a, "dev", "ul0")
        nsx(self.ul, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.state.underlay == "ipv6":  # the router between the IPv6-only underlay subnets
            for s in (0, 1):
                nsx(self.ul, "ip", "addr", "add", f"{UNDERLAY6_ONLY}:{s}::fe/64", "dev", "ul0", "nodad")
            nsx(self.ul, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def _plug(self, ns: str, port: str, ip: str, gw: str) -> None:
        sh("ip", "netns", "add", ns)
        nsx(self.ul, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        nsx(self.ul, "ip", "link", "set", port, "master", "ul0", "up")
        nsx(ns, "ip", "link", "set", "lo", "up")
        nsx(ns, "ip", "link", "set", "eth0", "up")
        nsx(ns, "ip", "addr", "add", ip, "dev", "eth0")
        nsx(ns, "ip", "route", "add", "default", "via", gw)

    def _host(self, h: HostInfo, i: int) -> None:
        if ":" in h.ip:  # only IPv6 on the underlay: no IPv4 address, an IPv6 default route
            sh("ip", "netns", "add", h.ns)
            nsx(self.ul, "ip", "link", "add", f"p{h.name}", "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            nsx(self.ul, "ip", "link", "set", f"p{h.name}", "master", "ul0", "up")
            for dev in ("lo", "eth0"):
                nsx(h.ns, "ip", "link", "set", dev, "up")
            nsx(h.ns, "ip", "addr", "add", f"{h.ip}/64", "dev", "eth0", "nodad")
            nsx(h.ns, "ip", "-6", "route", "add", "default", "via", h.cidr.split("/")[0] + "fe")
        else:
            gw = h.ip.rsplit(".", 1)[0] + ".254"
            self._plug(h.ns, f"p{h.name}", f"{h.ip}/24", gw)
            nsx(h.ns, "ip", "addr", "add", f"{underlay6(h.ip)}/64", "dev", "eth0", "nodad")
        nsx(h.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _internet(self) -> None:
        self._plug(self.inet, "pinet", f"{INET_IP}/24", f"{INET_NET}.254")
        nsx(self.inet, "ip", "addr", "add", f"{INET_IP6}/64", "dev", "eth0", "nodad")
        log = open(os.path.join(self.dir, "inet-web.log"), "ab")
        web = subprocess.Popen(["ip", "netns", "exec", self.inet, sys.executable, "-m", "tether.lab.echo_web",
                                "--port", "80"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        dns = subprocess.Popen(["ip", "netns", "exec", self.inet, "dnsmasq", "--no-daemon", "--no-resolv",
                                "--no-hosts", f"--listen-address={INET_IP}", "--bind-interfaces", "--port=53",
                                "--address=/example.test/198.19.255.80", "--address=/www.example.test/198.19.255.81",
                                "--local-ttl=60",
                                f"--pid-file={self.dir}/inet-dns.pid", "--log-facility=-"],
                               stdout=open(os.path.join(self.dir, "inet-dns.log"), "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        self.state.inet_pids = [web.pid, dns.pid]
        self.save()
        wait_for(lambda: port_open(self.inet, INET_IP, 80), 10, "the internet web server")

    # --- processes --------------------------------------------------------------------------------

    def start_server(self, env: dict[str, str] | None = None) -> None:
        """Start the lab's server; `env` adds to its environment (the clock-jump test runs it under
        libfaketime this way)."""
        state_dir = os.path.join(self.dir, "server")
        os.makedirs(state_dir, exist_ok=True)
        if self.state.store.startswith("etcd://"):  # an external cluster: `lab up --etcd-endpoints`
            store = self.state.store
        elif self.state.store == "etcd":
            if not alive(self.state.etcd_pid):
                self._start_etcd()
            store = f"etcd://127.0.0.1:{self._etcd_port}"
        else:
            store = f"sqlite://{state_dir}/tether.db"
        if not self.state.server_port:
            self.state.server_port = free_port()
        log = open(os.path.join(self.dir, "server.log"), "ab")
        # on an IPv6-only underlay one dual-stack socket serves both the CLI's IPv4 and the hosts' IPv6
        at, sans = ((f"[::]:{API_PORT}", ["--tls-san", CTL_IP, "--tls-san", CTL_IP6]) if self.state.underlay == "ipv6"
                    else (f"{CTL_IP}:{API_PORT}", ["--tls-san", CTL_IP]))
        p = subprocess.Popen([sys.executable, "-m", "tether.lab.netns_listen", self.ctl, at, "--",
                              sys.executable, "-m", "tether.server.main", "--store", store, "--state-dir", state_dir,
                              "--listen", f"unix://{self.server_socket}",
                              "--listen", f"127.0.0.1:{self.state.server_port}", "--listen", "fd://{fd}",
                              *sans, "--gc-interval", "10", *self.state.server_args],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **env} if env else None)
        self.state.server_pid = p.pid
        self.save()
        wait_for(lambda: _http_ok(self.server_url + "/healthz"), 20, "the server")

    @property
    def _etcd_port(self) -> int:
        with open(os.path.join(self.dir, "etcd.port")) as f:
            return int(f.read())

    def _start_etcd(self) -> None:
        cport, pport = free_port(), free_port()
        with open(os.path.join(self.dir, "etcd.port"), "w") as f:
            f.write(str(cport))
        data = os.path.join(self.dir, "etcd")
        p = subprocess.Popen(["etcd", "--name", "lab", "--data-dir", data,
                              "--listen-client-urls", f"http://127.0.0.1:{cport}",
                              "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                              "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                              "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                              "--initial-cluster", f"lab=http://127.0.0.1:{pport}", "--log-level", "error"],
                             stdout=open(os.path.join(self.dir, "etcd.log"), "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.state.etcd_pid = p.pid
        self.save()
        wait_for(lambda: port_open(None, "127.0.0.1", cport), 20, "etcd")

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        stop_pid(self.state.server_pid, sig)
        self.state.server_pid = None
        self.save()

    def agent_dir(self, host: str) -> str:
        return os.path.join(self.dir, host)

    def cni_socket(self, host: str) -> str:
        return os.path.join(self.agent_dir(host), "cni.sock")

    def docker_plugin_dir(self, host: str) -> str:
        """Where this host's agent serves Docker's plugin socket (a lab dockerd bind-mounts it over
        /run/docker/plugins), so hosts never share the machine's /run/docker/plugins."""
        return os.path.join(self.agent_dir(host), "docker-plugins")

    def docker_swarm_dir(self, host: str) -> str:
        """Where this host's agent serves the socket the Swarm (managed) plugin forwards to; the plugin
        bind-mounts this directory (tether.lab.swarm)."""
        return os.path.join(self.agent_dir(host), "docker-swarm")

    def docker_socket(self, host: str) -> str:
        """The API socket of a lab dockerd on this host (see tether.lab.dockerd), which its agent asks
        for container names and labels."""
        return os.path.join(self.agent_dir(host), "docker.sock")

    def start_agent(self, host: str, wait: bool = True, servers: list[str] | None = None) -> None:
        """Start the host's agent; `servers` (host-credential labs only) replaces the server list."""
        h = self.host(host)
        d = self.agent_dir(host)
        os.makedirs(d, exist_ok=True)
        env = {**os.environ, "TETHER_DOCKER_PLUGIN_SOCKET": os.path.join(self.docker_plugin_dir(host), "tether.sock"),
               "TETHER_DOCKER_SWARM_SOCKET": os.path.join(self.docker_swarm_dir(host), "tether.sock"),
               "TETHER_DOCKER_HOST": f"unix://{self.docker_socket(host)}"}
        log = open(os.path.join(d, "agent.log"), "ab")
        if self.state.agent_auth == "host":  # over the underlay, TLS, its own credential (joins at first start)
            auth = ["--server", ",".join(servers or [self.underlay_url]), "--join-token", self.state.bootstrap_token,
                    "--ca-hash", self.state.ca_hash]
        else:
            auth = ["--server", f"unix://{self.server_socket}",
                    "--token-file", os.path.join(self.dir, "server", "token")]
        p = subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable, "-m", "tether.agent.main", *auth,
                              "--host", h.name, "--underlay-ip", h.ip, "--state-dir", d,
                              "--cni-socket", self.cni_socket(host), "--upstream-dns", INET_IP,
                              *self.state.agent_args],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        h.agent_pid = p.pid
        self.save()
        if wait:
            self.wait_agent(host)

    def wait_agent(self, host: str, timeout: float = 30) -> None:
        wait_for(lambda: os.path.exists(self.cni_socket(host)) and self.agent_status(host) == 0, timeout,
                 f"the agent on {host}")

    def agent_status(self, host: str) -> int:
        """0 when the agent is ready, else the CNI error code STATUS answered (50: not available)."""
        code, out = self.cni(host, "STATUS", {"cniVersion": "1.1.0", "name": "status", "type": "tether"})
        if code == 0:
            return 0
        try:
            return int(json.loads(out)["code"])
        except (ValueError, KeyError, TypeError):
            return code

    def kill_agent(self, host: str, sig: int = signal.SIGKILL) -> None:
        h = self.host(host)
        stop_pid(h.agent_pid, sig)
        h.agent_pid = None
        self.save()

    # --- pods -------------------------------------------------------------------------------------

    def cni(self, host: str, command: str, config: dict, *, container_id: str = "", netns: str = "",
            ifname: str = "eth0", args: str = "") -> tuple[int, str]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_ARGS": args, "CNI_PATH": os.path.join(self.dir, "cni-bin") + ":/usr/lib/cni",
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        config = {"agent_socket": self.cni_socket(host), **config}
        r = subprocess.run([os.path.join(self.dir, "cni-bin", "tether")], input=json.dumps(config),
                           capture_output=True, text=True, env=env, timeout=120)
        return r.returncode, r.stdout

    def run_pod(self, host: str, name: str, network: str, namespace: str = "default",
                labels: dict[str, str] | None = None, ip: str | None = None,
                ports: list[dict] | None = None, security_groups: list[str] | None = None,
                cni_args: str = "", cni_config: dict | None = None, container_id: str | None = None) -> PodInfo:
        """`cni_args` are more CNI_ARGS (kubelet adds K8S_POD_INFRA_CONTAINER_ID and K8S_POD_UID);
        `cni_config` more keys of the network's CNI configuration; `container_id` the CNI_CONTAINERID
        (the namespace's name unless given: under kubelet it is the CRI sandbox's 64-hex id)."""
        h = self.host(host)
        ns = f"{self.name}-{host}-{name}"
        if f"{host}/{name}" in self.state.pods:
            raise RuntimeError(f"pod {host}/{name} already runs in lab {self.name}; remove it with "
                               f"`tether lab rm {host}/{name}` or pick another name")
        sh("ip", "netns", "add", ns)
        container_id = container_id or ns
        args = f"IgnoreUnknown=1;K8S_POD_NAME={name};K8S_POD_NAMESPACE={namespace}" + (f";IP={ip}" if ip else "")
        args += f";{cni_args}" if cni_args else ""
        config: dict[str, Any] = {"cniVersion": CNI_VERSION, "name": network, "type": "tether"}
        if labels is not None:  # kubelet's runtime passes none: then the config has no "labels" key
            config["labels"] = labels
        if ports:
            config["ports"] = ports
        if security_groups is not None:
            config["security_groups"] = security_groups
        config.update(cni_config or {})
        code, out = self.cni(h.name, "ADD", config, container_id=container_id, netns=f"/var/run/netns/{ns}",
                             args=args)
        if code != 0:
            sh("ip", "netns", "del", ns, check=False)
            err = json.loads(out) if out.strip().startswith("{") else {"code": -1, "msg": out}
            raise CniFailure(err.get("code", -1), err.get("msg", out), out)
        res = json.loads(out)
        pod = PodInfo(name, host, ns, network, namespace, container_id,
                      [i["address"].split("/")[0] for i in res["ips"]], labels or {}, res, args, cni_config or {})
        nsx(ns, "ip", "link", "set", "lo", "up")
        write_resolv_conf(ns, res.get("dns") or {})
        self.state.pods[f"{host}/{name}"] = pod
        self.save()
        return pod

    def pod(self, ref: str) -> PodInfo:
        if ref in self.state.pods:
            return self.state.pods[ref]
        found = [p for k, p in self.state.pods.items() if p.name == ref]
        if len(found) != 1:
            raise KeyError(f"pod {ref!r} not found (or ambiguous); use HOST/POD")
        return found[0]

    def rm_pod(self, ref: str) -> None:
        pod = self.pod(ref)
        config = {"cniVersion": CNI_VERSION, "name": pod.network, "type": "tether", **pod.cni_config,
                  "prevResult": pod.result}
        code, out = self.cni(pod.host, "DEL", config, container_id=pod.container_id,
                             netns=f"/var/run/netns/{pod.ns}", args=pod.cni_args)
        if code != 0:
            raise RuntimeError(f"CNI DEL failed: {out}")
        sh("ip", "netns", "del", pod.ns, check=False)
        remove_netns_etc(pod.ns)
        del self.state.pods[f"{pod.host}/{pod.name}"]
        self.save()

    def exec(self, ref: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return nsx(self.pod(ref).ns, *cmd, check=False, timeout=timeout)

    def ping(self, ref: str, ip: str, count: int = 1, wait: float = 1) -> bool:
        r = self.exec(ref, "ping", "-c", str(count), "-W", str(wait), "-i", "0.2", ip)
        return r.returncode == 0

    def reaches(self, ref: str, ip: str, within: float = 10) -> bool:
        """Ping until one answer comes back or `within` seconds pass: a new pod's route reaches the
        other hosts a moment after its CNI ADD returns (the agents converge asynchronously)."""
        deadline = time.monotonic() + within
        while True:
            if self.ping(ref, ip):
                return True
            if time.monotonic() > deadline:
                return False

    # --- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        from tether.lab.containerd import stop_lab_nodes

        stop_lab_nodes(self.dir)  # kubelets, then their pods' sandboxes (CNI DEL through the agents), containerds
        for pid in self.state.kube_pids:
            stop_pid(pid)
        from tether.lab.dockerd import stop_lab_dockerds

        stop_lab_dockerds(self.dir)  # before the agents: dockerd asks them to release its endpoints
        for h in self.state.hosts:
            stop_pid(h.agent_pid)
            self._stop_dhcp(h.name)
        stop_pid(self.state.server_pid)
        stop_pid(self.state.etcd_pid)
        for pid in self.state.inet_pids:
            stop_pid(pid)
        for ns in lab_namespaces(self.name):
            sh("ip", "netns", "del", ns, check=False)
        if os.path.isdir(NETNS_ETC):  # the pods' resolv.conf files
            for ns in os.listdir(NETNS_ETC):
                if ns.startswith(f"{self.name}-"):
                    remove_netns_etc(ns)
        self._keep_logs()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_dhcp(self, host: str) -> None:
        """The dnsmasq of a host's VM ports, if its agent was killed before stopping it (by its PID
        file, only if that PID is still that dnsmasq); its files outlive the lab in /run otherwise."""
        from tether.calc.names import dhcp_dir

        d = dhcp_dir(host, os.path.abspath(self.agent_dir(host)))
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(d, "dnsmasq.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--pid-file={d}/dnsmasq.pid".encode() in f.read():
                    stop_pid(pid)
        with contextlib.suppress(OSError):
            shutil.copy(os.path.join(d, "dnsmasq.log"), os.path.join(self.dir, f"{host}-dnsmasq.log"))
        shutil.rmtree(d, ignore_errors=True)

    def _keep_logs(self) -> None:
        """Logs outlive the lab (in /tmp/tether-lab-logs/<name>) so a failed test can be explained."""
        dest = os.path.join(LOG_ROOT, self.name)
        for root, _dirs, files in os.walk(self.dir):
            for f in files:
                if f.endswith(".log"):
                    rel = os.path.relpath(os.path.join(root, f), self.dir)
                    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copy(os.path.join(root, f), os.path.join(dest, rel))


NETNS_ETC = "/etc/netns"  # `ip netns exec NS` bind-mounts NETNS_ETC/NS/resolv.conf over /etc/resolv.conf


def check_hosts(hosts: int) -> None:
    """A lab's host count fits its underlay numbering (198.18.<s>.<i>, below the .250 and .254 addresses)."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts {hosts}: 1 to {MAX_HOSTS} (lab hosts are 198.18.<s>.1-{MAX_HOSTS})")


NEIGH_SYSCTL = "/proc/sys/net/ipv{v}/neigh/default/gc_thresh{n}"


def neighbour_room(hosts: int, progress=print) -> None:
    """Make the kernel's neighbour tables big enough for a lab of `hosts`, by raising (never lowering)
    gc_thresh2/3. The ARP and NDP caches are one table for the whole machine, every namespace's
    entries counted together, 1,024 by default; each lab host keeps an entry per peer it talks to on
    the underlay (path health probes them all), so ~hosts^2 entries: past ~30 hosts the table
    overflows ("neighbor table overflow" in the kernel log) and hosts stop answering on the underlay,
    for every namespace on the machine. The only change the lab makes outside its namespaces."""
    need = 2 * hosts * hosts + 4096
    if hosts <= 20:
        return
    for v in (4, 6):
        with open(NEIGH_SYSCTL.format(v=v, n=3)) as f:
            have = int(f.read())
        if have >= need:
            continue
        progress(f"raising net.ipv{v}.neigh.default.gc_thresh3 {have} -> {need} (gc_thresh2 -> {need // 2}): "
                 f"the machine's neighbour table is shared by all namespaces and {hosts} hosts need ~{hosts}^2 "
                 "entries")
        for n, value in ((3, need), (2, need // 2)):  # thresh3 first: thresh2 may not exceed it
            with open(NEIGH_SYSCTL.format(v=v, n=n), "w") as f:
                f.write(str(value))


def underlay6(ip: str) -> str:
    """A lab host's IPv6 underlay address, from its IPv4 one: 198.18.<s>.<i> -> fd00:198:18::<s>:<i>."""
    _a, _b, s, i = ip.split(".")
    return f"{UNDERLAY6}{s}:{i}"


def write_resolv_conf(ns: str, dns: dict[str, Any]) -> None:
    """What a container runtime does with the CNI result's `dns`: the pod's resolv.conf (read by
    every program started with `ip netns exec`, as a container's is)."""
    if not dns.get("nameservers"):
        return
    lines = [f"nameserver {ip}" for ip in dns["nameservers"]]
    if dns.get("search"):
        lines.append("search " + " ".join(dns["search"]))
    if dns.get("options"):
        lines.append("options " + " ".join(dns["options"]))
    os.makedirs(os.path.join(NETNS_ETC, ns), exist_ok=True)
    with open(os.path.join(NETNS_ETC, ns, "resolv.conf"), "w") as f:
        f.write("\n".join(lines) + "\n")


def remove_netns_etc(ns: str) -> None:
    shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)


def lab_namespaces(name: str) -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(f"{name}-")]


def all_labs() -> list[str]:
    if not os.path.isdir(LAB_ROOT):
        return []
    return sorted(d for d in os.listdir(LAB_ROOT) if os.path.isdir(os.path.join(LAB_ROOT, d)))


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def port_open(ns: str | None, ip: str, port: int) -> bool:
    if ns is None:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((ip, port)) == 0
    return nsx(ns, sys.executable, "-c", f"import socket; socket.create_connection(('{ip}', {port}), 1)",
               check=False).returncode == 0
