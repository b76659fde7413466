"""A private dockerd inside a lab host namespace, for tests, benchmarks and the demo.

Why it looks like this (docs/RUNTIMES.md): `ip netns exec` gives a private mount
namespace with a fresh /sys that lacks cgroup mounts, so a small shell prelude remounts them, and
bind-mounts the host's own plugin directory over /run/docker/plugins (dockerd always looks there),
so each lab host's dockerd finds only its own agent's `tether.sock`. A holder process keeps that
mount namespace alive and dockerd is entered into it with nsenter, so a restarted dockerd
(`--live-restore`) still sees the mounts and network namespaces of the containers it left running.
Everything dockerd writes (data root, exec root, pid file, API socket) lives in one directory of
ours; nothing touches the machine's own Docker, interfaces or iptables. Processes stop by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tether.agent.dns import DNS_IP
from tether.lab.cluster import alive, sh, stop_pid, wait_for

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client, the same version as the daemon
IMAGE = "tether-bb:local"

PRELUDE = r"""set -e
if [ "$1" = "--plugins" ]; then mkdir -p "$2" /run/docker/plugins; mount --bind "$2" /run/docker/plugins; shift 2; fi
if ! mountpoint -q /sys/fs/cgroup; then
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
    mkdir -p /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done
  mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
exec "$@"
"""


def available() -> str | None:
    """Why dockerd cannot run here (None: it can)."""
    for tool in (DOCKERD, DOCKER):
        if not os.path.exists(tool):
            return f"{tool} is missing (Debian's docker.io; scripts/install-deps installs it)"
    if shutil.which("busybox") is None:
        return "busybox is missing (busybox-static)"
    return None


class Dockerd:
    """One dockerd in network namespace `ns`, its files under `root`, its plugins in `plugin_dir`."""

    def __init__(self, ns: str, root: str | Path, plugin_dir: str, socket_path: str, live_restore: bool = True) -> None:
        """`live_restore`: containers outlive a dockerd restart (Docker refuses it in Swarm mode)."""
        self.ns, self.root, self.plugin_dir, self.socket = ns, Path(root), plugin_dir, socket_path
        self.live_restore = live_restore
        self.pid: int | None = None
        self.holder_pid: int | None = None

    @property
    def host_url(self) -> str:
        return f"unix://{self.socket}"

    def _hold(self) -> None:
        """The holder: the prelude's mount namespace, kept alive while this object lives."""
        if alive(self.holder_pid):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "prelude.sh").write_text(PRELUDE)
        ready = self.root / "holder.ready"
        ready.unlink(missing_ok=True)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, "sh", str(self.root / "prelude.sh"), "--plugins",
                              self.plugin_dir, "sh", "-c", f"touch {ready}; exec sleep 1000000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.holder_pid = p.pid
        wait_for(ready.exists, 30, f"the mount namespace holder for {self.ns}")

    def start(self, timeout: float = 60, on_spawn=None) -> None:
        """Start dockerd and wait for its API; `on_spawn` runs once its PID is known (to save it)."""
        self._hold()
        log = open(self.root / "dockerd.log", "ab")
        p = subprocess.Popen(
            ["nsenter", f"--target={self.holder_pid}", "--mount", "--net",
             DOCKERD, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host_url, "--bridge=none",
             "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
             "--userland-proxy=false", *(["--live-restore"] if self.live_restore else []), "--log-level=warn",
             # Docker's embedded resolver forwards what it does not know to the agent's DNS, from
             # the container's address: names on Tether networks resolve with no per-container flag
             "--dns", DNS_IP],
            # Swarm tasks use the image imported here instead of asking a registry (none is reachable)
            env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = p.pid
        if on_spawn is not None:
            on_spawn()
        wait_for(lambda: self.docker("version", "--format", "{{.Server.Version}}", check=False).returncode == 0,
                 timeout, f"dockerd in {self.ns}")

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, "-H", self.host_url, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def import_busybox(self) -> None:
        """An image made offline: busybox-static and the applets the tests use."""
        tar = self.root / "busybox.tar"
        if not tar.exists():
            img = self.root / "img"
            (img / "bin").mkdir(parents=True, exist_ok=True)
            shutil.copy(shutil.which("busybox") or "/bin/busybox", img / "bin" / "busybox")
            for tool in ("sh", "httpd", "sleep", "ip", "ping", "wget", "nc", "nslookup", "cat", "hostname", "true"):
                if not (img / "bin" / tool).exists():
                    (img / "bin" / tool).symlink_to("busybox")
            (img / "www").mkdir(exist_ok=True)
            (img / "www" / "index.html").write_text("hello from docker\n")
            sh("tar", "-C", str(img), "-cf", str(tar), ".")
        with open(tar, "rb") as f:
            r = subprocess.run([DOCKER, "-H", self.host_url, "import", "-", IMAGE], stdin=f, capture_output=True,
                               text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"docker import failed: {r.stderr.strip()}")

    def stop(self, remove_containers: bool = True) -> None:
        """Stop the daemon by PID (its containerd and shims go with it after a clean shutdown)."""
        if self.pid is None:
            return
        if remove_containers and alive(self.pid):
            ids = self.docker("ps", "-aq", check=False, timeout=60).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
        stop_pid(self.pid, signal.SIGTERM, wait=30)
        deadline = time.time() + 5
        while alive(self.pid) and time.time() < deadline:
            time.sleep(0.05)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the daemon only (containers keep running, as after a dockerd crash)."""
        stop_pid(self.pid, signal.SIGKILL, wait=5)
        self.pid = None

    def shim_pids(self) -> list[int]:
        """The containerd shims of this daemon: their command line names our exec root's containerd
        socket (`-address <exec-root>/containerd/containerd.sock`), which no other daemon uses."""
        mark = str(self.root / "exec") + "/"
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"containerd-shim-runc-v2") and any(a.startswith(mark.encode())
                                                                              for a in argv):
                    out.append(int(entry))
        return out

    def cleanup(self, keep_log: bool = False) -> None:
        """Containers, dockerd, the containerd it started (by its pid file), its shims, the holder, then
        its files (all but `dockerd.log` with `keep_log`, which a lab keeps with its other logs)."""
        self.stop()
        with contextlib.suppress(OSError, ValueError):
            stop_pid(int((self.root / "exec" / "containerd" / "containerd.pid").read_text().strip()), wait=10)
        for pid in self.shim_pids():  # they outlive containerd when a container could not be removed
            stop_pid(pid, signal.SIGKILL, wait=5)
        stop_pid(self.holder_pid, signal.SIGKILL, wait=5)
        self.holder_pid = None
        if not keep_log:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for entry in self.root.glob("*"):
            if entry.name == "dockerd.log":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def lab_dockerd(lab, host: str, live_restore: bool = True) -> Dockerd:
    """The dockerd of a lab host (`tether lab up --docker`, `tether lab docker HOST`), its files in the
    lab's directory, its PIDs saved there so `tether lab down` stops it (`stop_lab_dockerds`)."""
    return Dockerd(lab.host(host).ns, Path(lab.dir) / "dockerd" / host, lab.docker_plugin_dir(host),
                   lab.docker_socket(host), live_restore=live_restore)


def save_pids(d: Dockerd) -> None:
    d.root.mkdir(parents=True, exist_ok=True)
    (d.root / "pids").write_text(f"{d.pid or 0} {d.holder_pid or 0}\n")


def _saved_pids(root: Path) -> tuple[int, int] | None:
    try:
        pid, holder = (int(x) for x in (root / "pids").read_text().split())
    except (OSError, ValueError):
        return None
    return pid, holder


def running_lab_dockerd(lab, host: str) -> Dockerd | None:
    """The lab host's dockerd when it already runs (so `tether lab docker HOST` never starts a second)."""
    d = lab_dockerd(lab, host)
    pids = _saved_pids(d.root)
    if pids is None or not alive(pids[0]) or not alive(pids[1]):
        return None
    d.pid, d.holder_pid = pids
    return d


def start_lab_dockerd(lab, host: str, live_restore: bool = True) -> Dockerd:
    """Start (or find) the lab host's dockerd, with the busybox image imported. Its PIDs are saved
    before it is waited for, so a dockerd that fails to come up is still stopped by `tether lab down`."""
    d = running_lab_dockerd(lab, host)
    if d is not None:
        return d
    d = lab_dockerd(lab, host, live_restore=live_restore)
    try:
        d.start(on_spawn=lambda: save_pids(d))
        d.import_busybox()
    except BaseException:
        d.cleanup(keep_log=True)
        raise
    return d


def start_lab_dockerds(lab, progress=print, live_restore: bool = True) -> list[Dockerd]:
    """`tether lab up --docker`: a dockerd on every lab host, started side by side (each ~1 s);
    without `live_restore` for Swarm, which refuses it."""
    from concurrent.futures import ThreadPoolExecutor

    hosts = [h.name for h in lab.state.hosts]
    with ThreadPoolExecutor(max_workers=len(hosts) or 1) as pool:
        futures = {h: pool.submit(start_lab_dockerd, lab, h, live_restore) for h in hosts}
        out = []
        for h, f in futures.items():
            d = f.result()
            progress(f"dockerd on {h}: export DOCKER_HOST={d.host_url}")
            out.append(d)
    return out


def stop_lab_dockerds(lab_dir: str) -> None:
    """Every dockerd started in this lab: containers, daemon, containerd, shims, holder."""
    base = Path(lab_dir) / "dockerd"
    if not base.is_dir():
        return
    for root in base.iterdir():
        pids = _saved_pids(root)
        if pids is None:
            continue
        d = Dockerd("", root, "", str(root.parent.parent / root.name / "docker.sock"))
        d.pid, d.holder_pid = pids
        with contextlib.suppress(Exception):
            d.cleanup(keep_log=True)
