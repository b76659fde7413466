"""containerd's CRI plugin networking pod sandboxes with Tether, as on a Kubernetes node: a private
containerd (its own root, state, socket and CNI directories under one directory), an offline
sandbox image made from busybox-static, and `cri-sandbox` (tools/k8s) making the CRI calls
kubelet makes for a pod (RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox).
containerd then calls Tether's CNI plugin itself; a recorder in front of the plugin keeps each
call (environment and config) so tests can compare it with `run_kube_pod`'s. And a Kubernetes
node per lab host (`start_lab_nodes`, `stop_lab_nodes`): that containerd with a real kubelet
(docs/KUBERNETES.md, "kubelet in the lab").
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

PAUSE_IMAGE = "tether.local/pause:1"
BUSYBOX = "/bin/busybox"  # busybox-static (scripts/install-deps)


def write_pause_image(path: str) -> None:
    """An OCI image archive for `ctr images import`: busybox-static whose entrypoint sleeps, the
    pod sandbox's "pause" process (nothing is pulled: test traffic never leaves the machine)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest, len(data)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        t.add(BUSYBOX, "bin/busybox")
        for tool in ("sh", "sleep", "ip", "ping"):
            ti = tarfile.TarInfo(f"bin/{tool}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(ti)
    layer = blob(gzip.compress(raw.getvalue()))
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]},
    }).encode())
    manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer[0],
                    "size": layer[1]}],
    }).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest[0], "size": manifest[1],
        "annotations": {"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "1"}}]}
    with tarfile.open(path, "w") as out:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":")[1], data)


RECORDER = """#!{python}
# records the runtime's CNI call (CNI_* environment and the config on stdin), then runs {plugin}
import json, os, subprocess, sys
stdin = sys.stdin.buffer.read()
with open({log!r}, "a") as f:
    f.write(json.dumps({{"env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
                        "config": json.loads(stdin)}}) + "\\n")
r = subprocess.run([{plugin!r}], input=stdin, stdout=sys.stdout.buffer)
sys.exit(r.returncode)
"""


def stop_and_unmount(pid: int | None, directory: str) -> None:
    """Stop a daemon by its PID (SIGTERM, then SIGKILL after 15 s) and lazily unmount whatever it
    mounted under its directory, deepest first."""
    from tether.lab.cluster import stop_pid

    stop_pid(pid, wait=15)
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(directory)]
    for m in reversed(mounts):
        subprocess.run(["umount", "-l", m], capture_output=True)


@dataclass
class Containerd:
    """A containerd whose CRI plugin calls Tether's CNI plugin (through the recorder) with
    `cni_config` as its only network."""
    dir: str
    plugin: str  # Tether's CNI plugin binary
    cni_config: dict
    pid: int | None = None  # containerd's, once started (or as saved by the lab, to stop it later)
    sandboxes: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "containerd.sock")

    @property
    def calls_log(self) -> str:
        return os.path.join(self.dir, "cni-calls.jsonl")

    def calls(self) -> list[dict]:
        """The CNI calls containerd made: {"env": {CNI_COMMAND, CNI_ARGS, ...}, "config": {...}}."""
        if not os.path.exists(self.calls_log):
            return []
        with open(self.calls_log) as f:
            out = [json.loads(line) for line in f if line.strip()]
        return out

    def start(self, on_spawn=None) -> None:
        """Start containerd and import the sandbox image; `on_spawn()` runs as soon as its PID is
        known (the lab saves it there, so a containerd that fails to come up is still stopped)."""
        d = self.dir
        for sub in ("root", "state", "cni-bin", "cni-conf", "pods"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        recorder = os.path.join(d, "cni-bin", self.cni_config["type"])
        with open(recorder, "w") as f:
            f.write(RECORDER.format(python=sys.executable, plugin=self.plugin, log=self.calls_log))
        os.chmod(recorder, 0o755)
        loopback = os.path.join(d, "cni-bin", "loopback")  # containerd's CRI sets up the sandbox's lo with it
        if not os.path.exists(loopback):
            os.symlink("/usr/lib/cni/loopback", loopback)  # containernetworking-plugins
        with open(os.path.join(d, "cni-conf", "10-tether.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": self.cni_config["name"],
                       "plugins": [{k: v for k, v in self.cni_config.items() if k != "name"}]}, f)
        with open(os.path.join(d, "containerd.toml"), "w") as f:
            f.write(f"""version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{self.socket}"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # this VM withholds CAP_SYS_RESOURCE: runc cannot set the sandbox's oom_score_adj of -998
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "native"
      # runc's state under this directory too, not the machine's /run/containerd/runc
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "{d}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d}/cni-bin"
      conf_dir = "{d}/cni-conf"
""")
        proc = subprocess.Popen(["containerd", "--config", os.path.join(d, "containerd.toml")],
                                stdout=open(os.path.join(d, "containerd.log"), "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pid = proc.pid
        if on_spawn:
            on_spawn()
        deadline = time.time() + 30
        while self.ctr("version", check=False).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"containerd did not start; see {d}/containerd.log")
            time.sleep(0.2)
        image = os.path.join(d, "pause.tar")
        write_pause_image(image)
        self.ctr("images", "import", image)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=check, timeout=60)

    def run_sandbox(self, cri_sandbox: str, name: str, namespace: str, uid: str) -> dict:
        """kubelet's RunPodSandbox for a pod: containerd makes the netns and calls CNI ADD. Returns
        {"sandbox", "ip", "runtime", "cri"}."""
        r = subprocess.run([cri_sandbox, "-endpoint", self.socket, "-name", name, "-namespace", namespace,
                            "-uid", uid], capture_output=True, text=True, timeout=90)
        if r.returncode != 0:
            raise RuntimeError(f"RunPodSandbox failed: {r.stderr.strip()}; see {self.dir}/containerd.log")
        out = json.loads(r.stdout)
        self.sandboxes.append(out["sandbox"])
        return out

    def remove_sandbox(self, cri_sandbox: str, sandbox: str) -> None:
        """kubelet's StopPodSandbox + RemovePodSandbox: containerd calls CNI DEL."""
        r = subprocess.run([cri_sandbox, "-endpoint", self.socket, "-remove", sandbox], capture_output=True,
                           text=True, timeout=90)
        if r.returncode != 0:
            raise RuntimeError(f"removing sandbox {sandbox} failed: {r.stderr.strip()}")
        if sandbox in self.sandboxes:
            self.sandboxes.remove(sandbox)

    def live_sandboxes(self) -> list[str]:
        """Sandboxes containerd networked and has not released: CNI ADD without a later DEL (kubelet's
        as well as those made here)."""
        last: dict[str, str] = {}
        for call in self.calls():
            last[call["env"].get("CNI_CONTAINERID", "")] = call["env"].get("CNI_COMMAND", "")
        return [sb for sb, cmd in last.items() if sb and cmd == "ADD"]

    def cgroups(self) -> list[str]:
        """The cgroup directories runc made for this containerd's containers (sandboxes and the pods'
        containers), from runc's state under this directory."""
        out = []
        runc = os.path.join(self.dir, "runc")
        for ns in os.listdir(runc) if os.path.isdir(runc) else []:
            for ctr in os.listdir(os.path.join(runc, ns)):
                try:
                    with open(os.path.join(runc, ns, ctr, "state.json")) as f:
                        out += list((json.load(f).get("cgroup_paths") or {}).values())
                except (OSError, ValueError):
                    pass
        return out

    def shim_pids(self) -> list[int]:
        """This containerd's shims: their command line names its socket (`-address <dir>/containerd.sock`),
        which no other containerd uses."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                    if argv[0].endswith(b"containerd-shim-runc-v2") and self.socket.encode() in argv:
                        out.append(int(entry))
        return out

    def stop(self, cri_sandbox: str | None = None) -> None:
        """Remove what is left (sandboxes through CRI when `cri_sandbox` is given, which calls CNI
        DEL; then their shims and processes by the PIDs in containerd's state, mounts, cgroups,
        network namespaces), then stop containerd by its PID."""
        for sb in dict.fromkeys(self.sandboxes + self.live_sandboxes()) if cri_sandbox else ():
            try:
                self.remove_sandbox(cri_sandbox, sb)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        cgroups = self.cgroups()
        tasks = os.path.join(self.dir, "state", "io.containerd.runtime.v2.task", "k8s.io")
        for sb in os.listdir(tasks) if os.path.isdir(tasks) else []:
            for pidfile in ("init.pid", "shim.pid"):
                try:
                    with open(os.path.join(tasks, sb, pidfile)) as f:
                        os.kill(int(f.read().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for pid in self.shim_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stop_and_unmount(self.pid, self.dir)
        # runc made a cgroup /k8s.io/<container> in each hierarchy (and the parent): remove what is
        # left and empty (rmdir fails on a cgroup still in use, e.g. by another containerd's pods)
        roots = ["/sys/fs/cgroup"] + [os.path.join("/sys/fs/cgroup", h) for h in os.listdir("/sys/fs/cgroup")]  # v2, v1
        for call in self.calls():
            cgroups += [os.path.join(root, "k8s.io", call["env"].get("CNI_CONTAINERID", "-")) for root in roots]
        for path in sorted(set(cgroups), key=len, reverse=True):
            for _ in range(20):  # a killed process leaves its cgroup a moment later
                try:
                    os.rmdir(path)
                except OSError as e:
                    if e.errno == errno.EBUSY and path.startswith("/sys/fs/cgroup/"):
                        time.sleep(0.05)
                        continue
                break
        for root in roots:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, "k8s.io"))
        for call in self.calls():  # a netns containerd made and could not remove
            netns = call["env"].get("CNI_NETNS", "")
            if netns.startswith("/var/run/netns/cni-") and os.path.exists(netns):
                subprocess.run(["ip", "netns", "del", os.path.basename(netns)], capture_output=True)


KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication: {{anonymous: {{enabled: false}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
# this VM has cgroup v1 only; kubelet refuses it unless told
failCgroupV1: false
# leave the machine's cgroup tree alone (no /sys/fs/cgroup/*/kubepods)
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
# no iptables chains of kubelet's own in the lab host (Tether programs the host's nftables)
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://{socket}
# cheap when idle (a kubelet per lab host on a small machine): pods still start and stop at once
# (kubelet watches the apiserver and relists containerd every second), but the periodic work is rare
syncFrequency: 5m
fileCheckFrequency: 5m
nodeStatusUpdateFrequency: 1m
nodeStatusReportFrequency: 5m
nodeLeaseDurationSeconds: 240
cpuManagerReconcilePeriod: 5m
volumeStatsAggPeriod: 1h
containerLogMonitorInterval: 5m
imageMinimumGCAge: 24h
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{}}
localStorageCapacityIsolation: false
"""

# kubelet sets six machine-wide sysctls at start (vm.overcommit_memory=1, kernel.panic=10, ...;
# pkg/kubelet/cm setupKernelTunables). It runs in a mount namespace of its own where a file with the
# value it wants is bound over each, so the machine's are never changed; a tmpfs there covers
# /var/lib/kubelet, where it makes its device-plugin socket whatever its --root-dir.
KERNEL_TUNABLES = {"vm/overcommit_memory": 1, "vm/panic_on_oom": 0, "kernel/panic": 10, "kernel/panic_on_oops": 1,
                   "kernel/keys/root_maxkeys": 1000000, "kernel/keys/root_maxbytes": 25000000}
GUARD = r"""set -e
d="$1"; shift
mkdir -p "$d"
for kv in {tunables}; do
  k="${{kv%%=*}}"; f="$d/$(echo "$k" | tr / _)"; echo "${{kv#*=}}" > "$f"; mount --bind "$f" "/proc/sys/$k"
done
# kubelet's device-plugin socket is always /var/lib/kubelet/device-plugins/kubelet.sock: one of its own
mkdir -p /var/lib/kubelet
mount -t tmpfs -o mode=755,size=1m tether-kubelet /var/lib/kubelet
exec "$@"
"""


@dataclass
class Kubelet:
    """kubelet (tools/k8s/build.sh --kubelet) for lab host `host_ns`, using `containerd`: it runs in
    the host's network namespace (`nsenter --net`, keeping the cgroup mounts) and a mount namespace
    of its own (the sysctl guard above; mounts from the machine still propagate in), reaches the
    apiserver through `kubeconfig` (tether.lab.kube.host_kubeconfig) and serves on 127.0.0.1 only.
    `tether lab up --kubernetes` starts one per host (`start_lab_nodes`)."""
    dir: str
    binary: str
    host: str
    host_ns: str
    kubeconfig: str
    containerd: Containerd
    pid: int | None = None

    def start(self, on_spawn=None) -> None:
        from tether.lab.cluster import free_port

        os.makedirs(os.path.join(self.dir, "root"), exist_ok=True)
        config = os.path.join(self.dir, "kubelet.yaml")
        with open(config, "w") as f:
            f.write(KUBELET_CONFIG.format(port=free_port(), healthz=free_port(), socket=self.containerd.socket))
        guard = GUARD.format(tunables=" ".join(f"{k}={v}" for k, v in KERNEL_TUNABLES.items()))
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.host_ns}", "unshare", "--mount", "--propagation", "slave",
             "sh", "-c", guard, "guard", os.path.join(self.dir, "sysctl"),
             self.binary, f"--config={config}", "--housekeeping-interval=5m",
             f"--kubeconfig={self.kubeconfig}", f"--root-dir={self.dir}/root", f"--cert-dir={self.dir}/pki",
             f"--hostname-override={self.host}", "--v=1"],
            stdout=open(os.path.join(self.dir, "kubelet.log"), "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = proc.pid  # nsenter, unshare and sh exec: this is kubelet's PID
        if on_spawn:
            on_spawn()

    def stop(self) -> None:
        """Stop kubelet by its PID and unmount what it mounted under its directory (its own mount
        namespace goes with it). The pods' sandboxes stay with containerd (`Containerd.stop`)."""
        stop_and_unmount(self.pid, self.dir)


# --- a Kubernetes node per lab host (`tether lab up --kubernetes`) ------------------------------------

KUBELET_MISSING = ("kubelet is not built: `tools/k8s/build.sh --kubelet` builds it into the same cache as the "
                   "apiserver (about 3 CPU-minutes once the apiserver is built; scripts/install-deps runs it)")


def k8s_cache_dir() -> str:
    """Where tools/k8s/build.sh keeps the binaries ($TETHER_K8S_BIN wins), without building anything."""
    from tether.lab.kube import ROOT

    if os.environ.get("TETHER_K8S_BIN"):
        return os.environ["TETHER_K8S_BIN"]
    return subprocess.run([os.path.join(ROOT, "tools", "k8s", "build.sh"), "--print"], capture_output=True,
                          text=True, check=True).stdout.strip()


def kubelet_binary() -> str | None:
    """The kubelet tools/k8s/build.sh --kubelet built, or None (KUBELET_MISSING says what to do)."""
    path = os.path.join(k8s_cache_dir(), "kubelet")
    return path if os.access(path, os.X_OK) else None


def why_no_kubelet() -> str | None:
    """Why a lab cannot start kubelets here (None: it can)."""
    for tool in ("containerd", "ctr", "runc", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (scripts/install-deps installs containerd, runc and util-linux)"
    if not os.path.exists("/usr/lib/cni/loopback"):
        return "/usr/lib/cni/loopback is missing (containernetworking-plugins)"
    if kubelet_binary() is None:
        return KUBELET_MISSING
    return None


def node_dir(lab_dir: str, host: str) -> str:
    return os.path.join(lab_dir, "nodes", host)


def lab_node(lab, kube, host: str, binary: str) -> tuple[Containerd, Kubelet]:
    """The containerd and kubelet of a lab host, their files under <lab>/nodes/<host>. containerd
    calls Tether's CNI plugin with the lab's pod network and a kubeconfig, so the agent reads a new
    pod's labels at ADD and policies select it from its first packet."""
    from tether.lab.kube import LAB_NETWORK, host_kubeconfig

    d = node_dir(lab.dir, host)
    kubeconfig = host_kubeconfig(lab, kube)
    ctrd = Containerd(os.path.join(d, "containerd"), os.path.join(lab.dir, "cni-bin", "tether"),
                      {"cniVersion": "1.0.0", "name": LAB_NETWORK, "type": "tether",
                       "agent_socket": lab.cni_socket(host), "kubernetes": {"kubeconfig": kubeconfig}})
    return ctrd, Kubelet(os.path.join(d, "kubelet"), binary, host, lab.host(host).ns, kubeconfig, ctrd)


def _save_pids(ctrd: Containerd, kl: Kubelet) -> None:
    os.makedirs(os.path.dirname(ctrd.dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(ctrd.dir), "pids.json"), "w") as f:
        json.dump({"containerd": ctrd.pid, "kubelet": kl.pid}, f)


def start_lab_node(lab, kube, host: str, binary: str, timeout: float = 120) -> tuple[Containerd, Kubelet]:
    """containerd, then kubelet for a lab host; returns when its Node is Ready. PIDs are saved as soon
    as each process exists, so `tether lab down` stops them even if this fails."""
    ctrd, kl = lab_node(lab, kube, host, binary)
    ctrd.start(on_spawn=lambda: _save_pids(ctrd, kl))
    kl.start(on_spawn=lambda: _save_pids(ctrd, kl))
    from tether.lab.cluster import alive, wait_for

    ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"

    def is_ready() -> bool:
        if not alive(kl.pid):
            raise RuntimeError(f"kubelet for {host} exited; see {kl.dir}/kubelet.log")
        return kube.kubectl("get", "node", host, "-o", ready, check=False).stdout == "True"
    try:
        wait_for(is_ready, timeout, f"node {host} Ready (see {kl.dir}/kubelet.log)")
    except TimeoutError as e:
        if not alive(kl.pid):
            raise RuntimeError(f"kubelet for {host} exited; see {kl.dir}/kubelet.log") from None
        # the lab is torn down after this, its logs with it: say here what kubelet last said
        tail = _log_tail(os.path.join(kl.dir, "kubelet.log"))
        raise TimeoutError(f"{e}; the kubelet log ends with:\n{tail}") from None
    return ctrd, kl


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])[-4000:]
    except OSError as e:
        return f"(unreadable: {e})"


def start_lab_nodes(lab, kube, binary: str, progress=print) -> None:
    """A Kubernetes node per lab host: a private containerd (CRI, Tether as its CNI) and kubelet,
    started side by side."""
    from concurrent.futures import ThreadPoolExecutor

    hosts = [h.name for h in lab.state.hosts]
    with ThreadPoolExecutor(max_workers=len(hosts) or 1) as pool:
        futures = {h: pool.submit(start_lab_node, lab, kube, h, binary) for h in hosts}
        for h, f in futures.items():
            f.result()
            progress(f"kubelet on {h}: node Ready (containerd {node_dir(lab.dir, h)}/containerd)")


def lab_has_kubelets(lab_dir: str) -> bool:
    return os.path.isdir(os.path.join(lab_dir, "nodes"))


def stop_lab_nodes(lab_dir: str) -> None:
    """Every lab host's kubelet, then its pods' sandboxes (through CRI while the agents still run,
    so CNI DEL releases the addresses), containerd, and what they left (mounts, cgroups, netns)."""
    base = os.path.join(lab_dir, "nodes")
    if not os.path.isdir(base):
        return
    try:
        cri_sandbox: str | None = os.path.join(k8s_cache_dir(), "cri-sandbox")
    except (OSError, subprocess.CalledProcessError):
        cri_sandbox = None
    if cri_sandbox and not os.access(cri_sandbox, os.X_OK):
        cri_sandbox = None
    for host in sorted(os.listdir(base)):
        d = os.path.join(base, host)
        try:
            with open(os.path.join(d, "pids.json")) as f:
                pids = json.load(f)
        except (OSError, ValueError):
            pids = {}
        Kubelet(os.path.join(d, "kubelet"), "", host, "", "", None, pid=pids.get("kubelet")).stop()  # type: ignore[arg-type]
        ctrd = Containerd(os.path.join(d, "containerd"), "", {}, pid=pids.get("containerd"))
        with contextlib.suppress(Exception):
            from tether.lab.cluster import alive

            ctrd.stop(cri_sandbox if alive(ctrd.pid) else None)
        remove_pod_logs(ctrd.calls())


POD_LOGS = "/var/log/pods"  # kubelet's, whatever its --root-dir; containerd writes the containers' logs there
CONTAINER_LOGS = "/var/log/containers"  # kubelet's symlinks to them


def remove_pod_logs(calls: list[dict]) -> None:
    """The log directories kubelet made for these pods (<namespace>_<name>_<uid>, named by the CNI
    calls' K8S_POD_* arguments) and its symlinks to them: kubelet removes them only in its garbage
    collection, a minute after a pod goes, and the lab stops it before."""
    dirs = set()
    for call in calls:
        args = dict(kv.split("=", 1) for kv in call["env"].get("CNI_ARGS", "").split(";") if "=" in kv)
        if {"K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID"} <= set(args):
            name = f"{args['K8S_POD_NAMESPACE']}_{args['K8S_POD_NAME']}_{args['K8S_POD_UID']}"
            dirs.add(os.path.join(POD_LOGS, name))
    if os.path.isdir(CONTAINER_LOGS):
        for link in os.listdir(CONTAINER_LOGS):
            path = os.path.join(CONTAINER_LOGS, link)
            if os.path.islink(path) and any(os.readlink(path).startswith(d + "/") for d in dirs):
                os.unlink(path)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def lab_pod_sandbox(lab_dir: str, host: str, namespace: str, name: str) -> tuple[str, str] | None:
    """The sandbox containerd made for a pod kubelet runs on a lab host, and its network namespace
    (a name under /run/netns): from the latest CNI call for that pod, None if it was a DEL."""
    ctrd = Containerd(os.path.join(node_dir(lab_dir, host), "containerd"), "", {})
    found = None
    for call in ctrd.calls():
        env = call["env"]
        args = dict(kv.split("=", 1) for kv in env.get("CNI_ARGS", "").split(";") if "=" in kv)
        if args.get("K8S_POD_NAMESPACE") == namespace and args.get("K8S_POD_NAME") == name:
            found = ((env["CNI_CONTAINERID"], os.path.basename(env["CNI_NETNS"]))
                     if env.get("CNI_COMMAND") == "ADD" else None)
    return found
