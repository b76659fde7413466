"""containerd's CRI plugin networking pod sandboxes with Tether, as on a Kubernetes node: a private
containerd (its own root, state, socket and CNI directories under one directory), an offline
sandbox image made from busybox-static, and `cri-sandbox` (tools/k8s) making the CRI calls
kubelet makes for a pod (RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox).
containerd then calls Tether's CNI plugin itself; a recorder in front of the plugin keeps each
call (environment and config) so tests can compare it with `run_kube_pod`'s. kubelet itself
cannot run on this project's VMs (docs/KUBERNETES.md, "kubelet on this machine").
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
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


def stop_and_unmount(proc: subprocess.Popen | None, directory: str) -> None:
    """Stop a daemon by its PID (SIGTERM, then SIGKILL after 15 s) and lazily unmount whatever it
    mounted under its directory, deepest first."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
    proc: subprocess.Popen | None = None
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

    def start(self) -> None:
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
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d}/cni-bin"
      conf_dir = "{d}/cni-conf"
""")
        self.proc = subprocess.Popen(["containerd", "--config", os.path.join(d, "containerd.toml")],
                                     stdout=open(os.path.join(d, "containerd.log"), "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
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
        self.sandboxes.remove(sandbox)

    def stop(self, cri_sandbox: str | None = None) -> None:
        """Remove what is left (sandboxes, their shims by the PIDs in containerd's state, mounts),
        then stop containerd by its PID."""
        for sb in list(self.sandboxes):
            if cri_sandbox:
                try:
                    self.remove_sandbox(cri_sandbox, sb)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
        tasks = os.path.join(self.dir, "state", "io.containerd.runtime.v2.task", "k8s.io")
        for sb in os.listdir(tasks) if os.path.isdir(tasks) else []:
            for pidfile in ("init.pid", "shim.pid"):
                try:
                    with open(os.path.join(tasks, sb, pidfile)) as f:
                        os.kill(int(f.read().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        stop_and_unmount(self.proc, self.dir)
        # runc made a cgroup /k8s.io/<sandbox> in each hierarchy (and the parent): remove what is left
        # and empty (rmdir fails on a cgroup still in use, e.g. by another containerd's pods)
        roots = ["/sys/fs/cgroup"] + [os.path.join("/sys/fs/cgroup", h) for h in os.listdir("/sys/fs/cgroup")]  # v2, v1
        for call in self.calls():
            for root in roots:
                for path in (os.path.join(root, "k8s.io", call["env"].get("CNI_CONTAINERID", "-")),
                             os.path.join(root, "k8s.io")):
                    try:
                        os.rmdir(path)
                    except OSError:
                        pass
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
containerRuntimeEndpoint: unix://{socket}
"""


@dataclass
class Kubelet:
    """kubelet (tools/k8s/build.sh --kubelet) for lab host `host_ns`, using `containerd`: it runs in
    the host's network namespace (`nsenter --net`, keeping the cgroup mounts), reaches the
    apiserver through `kubeconfig` (tether.lab.kube.host_kubeconfig) and serves on 127.0.0.1 only.
    Opt-in: no test or CI job builds kubelet (docs/KUBERNETES.md, "kubelet on this machine")."""
    dir: str
    binary: str
    host: str
    host_ns: str
    kubeconfig: str
    containerd: Containerd
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        from tether.lab.cluster import free_port

        os.makedirs(os.path.join(self.dir, "root"), exist_ok=True)
        config = os.path.join(self.dir, "kubelet.yaml")
        with open(config, "w") as f:
            f.write(KUBELET_CONFIG.format(port=free_port(), healthz=free_port(), socket=self.containerd.socket))
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.host_ns}", self.binary, f"--config={config}",
             f"--kubeconfig={self.kubeconfig}", f"--root-dir={self.dir}/root", f"--cert-dir={self.dir}/pki",
             f"--hostname-override={self.host}", "--v=1"],
            stdout=open(os.path.join(self.dir, "kubelet.log"), "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self) -> None:
        """Stop kubelet by its PID (delete its pods first: kubelet is what stops their sandboxes) and
        unmount what it mounted under its directory."""
        stop_and_unmount(self.proc, self.dir)
