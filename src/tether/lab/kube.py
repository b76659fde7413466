"""A real Kubernetes control plane for the lab and tests: etcd and kube-apiserver built from
tools/k8s (the pinned release, once per machine by scripts/install-deps), on free loopback ports,
plus what kubelet would do for a pod bound to a lab host (`run_kube_pod`: the CNI call with
kubelet's arguments, for labs and tests without kubelets) and pods the lab's real kubelets run
(`kubelet_pod`; tether.lab.containerd starts them, see docs/KUBERNETES.md).

`start_kube(dir)` returns a `KubeApi` (`.kubeconfig`, `.kubectl(*args)`, `.apply(yaml)`,
`.compact()`, `.restart_apiserver()`, `.stop()`); the apiserver authenticates a static admin token
and signs service-account tokens with a key made per run; each run has its own etcd and prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import httpx

from tether.lab.cluster import Lab, PodInfo, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SERVICE_CIDR = "10.96.0.0/16"  # the same range as Tether's server default, so ClusterIPs are valid there


def k8s_bin() -> str:
    """The directory of kube-apiserver, kubectl and etcd ($TETHER_K8S_BIN, or tools/k8s/build.sh's
    cache, built now if this machine lacks them)."""
    if os.environ.get("TETHER_K8S_BIN"):
        return os.environ["TETHER_K8S_BIN"]
    r = subprocess.run([os.path.join(ROOT, "tools", "k8s", "build.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the Kubernetes control plane failed (run tools/k8s/build.sh): {r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def kubelet_bin() -> str:
    """kubelet, built now by tools/k8s/build.sh --kubelet if this machine lacks it (or waiting for the
    build scripts/install-deps started: build.sh holds a lock). $TETHER_K8S_BIN/kubelet if set."""
    if os.environ.get("TETHER_K8S_BIN"):
        return os.path.join(os.environ["TETHER_K8S_BIN"], "kubelet")
    r = subprocess.run([os.path.join(ROOT, "tools", "k8s", "build.sh"), "--kubelet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building kubelet failed (run tools/k8s/build.sh --kubelet): {r.stderr[-3000:]}")
    return os.path.join(r.stdout.strip().splitlines()[-1], "kubelet")


def stop_proc(p: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class KubeApi:
    dir: str
    bin: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    prefix: str = field(default_factory=lambda: f"/k8s-{uuid.uuid4().hex[:8]}")
    etcd: subprocess.Popen | None = None
    apiserver: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.dir, "kubeconfig")

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.etcd_port}"

    def prepare(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        key = os.path.join(self.dir, "sa.key")
        subprocess.run(["openssl", "genrsa", "-out", key, "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", key, "-pubout", "-out", key + ".pub"], check=True,
                       capture_output=True)
        with open(os.path.join(self.dir, "tokens.csv"), "w") as f:
            f.write(f'{self.token},admin,admin,"system:masters"\n')
        with open(self.kubeconfig, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.url}", insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: "{self.token}"}}
contexts:
- name: test
  context: {{cluster: test, user: admin}}
current-context: test
""")

    def start_etcd(self) -> None:
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.etcd = subprocess.Popen(
            [os.path.join(self.bin, "etcd"), "--name", "k8s", "--data-dir", os.path.join(self.dir, "etcd"),
             "--listen-client-urls", f"http://{self.etcd_endpoint}", "--advertise-client-urls",
             f"http://{self.etcd_endpoint}", "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-cluster", f"k8s=http://127.0.0.1:{self.etcd_peer}", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT)

    def start_apiserver(self) -> None:
        log = open(os.path.join(self.dir, "apiserver.log"), "ab")
        key = os.path.join(self.dir, "sa.key")
        self.apiserver = subprocess.Popen(
            [os.path.join(self.bin, "kube-apiserver"), "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={self.port}", f"--cert-dir={self.dir}/certs",
             f"--etcd-servers=http://{self.etcd_endpoint}", f"--etcd-prefix={self.prefix}",
             "--etcd-compaction-interval=0",  # the tests compact, to expire watches (410 Gone) when they choose
             f"--token-auth-file={self.dir}/tokens.csv", "--authorization-mode=RBAC",
             f"--service-account-key-file={key}.pub", f"--service-account-signing-key-file={key}",
             "--service-account-issuer=https://kubernetes.default.svc", f"--service-cluster-ip-range={SERVICE_CIDR}",
             # no kube-controller-manager makes the namespaces' default ServiceAccounts
             "--disable-admission-plugins=ServiceAccount",
             # the kubernetes Service's endpoints would be this loopback address, which the reconciler refuses
             "--endpoint-reconciler-type=none", "--v=1"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.apiserver.poll() is not None:
                tail = open(os.path.join(self.dir, "apiserver.log")).read()[-3000:]
                raise RuntimeError("kube-apiserver exited: " + tail)
            try:
                r = httpx.get(self.url + "/readyz", verify=False, timeout=2,
                              headers={"Authorization": f"Bearer {self.token}"})
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("kube-apiserver did not become ready within 120 s; see " + self.dir + "/apiserver.log")
        # the apiserver makes kube-system itself, a moment after it is ready
        self.wait(lambda: self.kubectl("get", "namespace", "kube-system", check=False).returncode == 0, 30)

    def start(self) -> None:
        self.prepare()
        self.start_etcd()
        self.start_apiserver()

    def restart_apiserver(self) -> None:
        stop_proc(self.apiserver)
        self.start_apiserver()

    def stop(self) -> None:
        stop_proc(self.apiserver)
        stop_proc(self.etcd)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([os.path.join(self.bin, "kubectl"), "--kubeconfig", self.kubeconfig, *args],
                           capture_output=True, text=True, input=input, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def apply(self, manifest: str) -> str:
        return self.kubectl("apply", "-f", "-", input=manifest).stdout

    def compact(self) -> int:
        """Compact the apiserver's etcd to its head: every watch from an older resourceVersion gets 410 Gone."""
        env = dict(os.environ, ETCDCTL_API="3")
        out = subprocess.run(["etcdctl", "--endpoints", self.etcd_endpoint, "endpoint", "status", "-w", "json"],
                             capture_output=True, text=True, check=True, env=env).stdout
        import json

        rev = json.loads(out)[0]["Status"]["header"]["revision"]
        subprocess.run(["etcdctl", "--endpoints", self.etcd_endpoint, "compact", str(rev)], check=True,
                       capture_output=True, env=env)
        return rev

    @staticmethod
    def wait(pred, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise TimeoutError("condition not met")


def start_kube(tmp: str) -> KubeApi:
    k = KubeApi(tmp, k8s_bin())
    try:
        k.start()
    except BaseException:
        k.stop()
        raise
    return k


def node_manifest(lab: Lab) -> str:
    """A Node per lab host (kubelet would register it): the name is the Tether host's."""
    return "\n---\n".join(
        f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {h.name}\n  labels: {{kubernetes.io/hostname: {h.name}}}\n"
        f"status:\n  addresses: [{{type: InternalIP, address: {h.ip}}}]" for h in lab.state.hosts)


def pod_manifest(name: str, namespace: str, host: str, labels: dict[str, str] | None = None,
                 ports: list[dict] | None = None) -> str:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                           "labels": labels or {}},
           "spec": {"nodeName": host, "containers": [{"name": "main", "image": "registry.invalid/pause:3",
                                                     "ports": ports or []}]}}
    return json.dumps(doc)


def run_kube_pod(lab: Lab, kube: KubeApi, host: str, name: str, network: str, namespace: str = "default",
                 labels: dict[str, str] | None = None, ports: list[dict] | None = None,
                 kubeconfig: bool = False) -> PodInfo:
    """What kubelet (with containerd as its CRI runtime) does for a pod bound to `host`: the Pod is
    in the apiserver (created here with spec.nodeName, as the scheduler would bind it), then CNI ADD
    as containerd's CRI plugin makes it: CNI_CONTAINERID = the sandbox's 64-hex id, CNI_IFNAME=eth0,
    CNI_NETNS a path under /var/run/netns, CNI_ARGS IgnoreUnknown=1, K8S_POD_NAMESPACE, K8S_POD_NAME,
    K8S_POD_INFRA_CONTAINER_ID (= the sandbox id), K8S_POD_UID, and no labels (DEL later passes the
    same). The pod's labels and named ports reach Tether through `tether kube`, or, with
    `kubeconfig`, from the agent reading the pod at ADD (the CNI config names the kubeconfig). Then,
    as kubelet does, the pod's status gets its address and Ready."""
    kube.apply(pod_manifest(name, namespace, host, labels, ports))
    uid = kube.kubectl("get", "pod", "-n", namespace, name, "-o", "jsonpath={.metadata.uid}").stdout.strip()
    sandbox = uuid.uuid5(uuid.NAMESPACE_URL, uid).hex + uuid.uuid4().hex  # a 64-hex sandbox id, as CRI makes
    pod = lab.run_pod(host, name, network, namespace=namespace, container_id=sandbox,
                      cni_args=f"K8S_POD_INFRA_CONTAINER_ID={sandbox};K8S_POD_UID={uid}",
                      cni_config={"kubernetes": {"kubeconfig": host_kubeconfig(lab, kube)}} if kubeconfig else None)
    report_pod_status(kube, namespace, name, pod.ips)
    return pod


def kubelet_pod_manifest(name: str, namespace: str, host: str, labels: dict[str, str] | None = None,
                         ports: list[dict] | None = None, command: list[str] | None = None) -> str:
    """A Pod bound to a lab host (`spec.nodeName`: the lab runs no scheduler) that its kubelet can
    run offline: the lab's busybox image (tether.lab.containerd.PAUSE_IMAGE, never pulled)."""
    from tether.lab.containerd import PAUSE_IMAGE

    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": host, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": PAUSE_IMAGE, "imagePullPolicy": "Never",
                                 "command": command or ["/bin/sleep", "2147483647"], "ports": ports or []}]}})


def kubelet_pod(lab: Lab, kube: KubeApi, host: str, name: str, namespace: str = "default",
                labels: dict[str, str] | None = None, ports: list[dict] | None = None,
                timeout: float = 90) -> PodInfo:
    """A pod run by the host's real kubelet (`tether lab up --kubernetes` with kubelets): the Pod is
    applied, kubelet has containerd make its sandbox (containerd calls Tether's CNI plugin) and start
    it; returns when it is Running, with the network namespace containerd made for it (`.ns`, a name
    under /run/netns, for probes) and its address from the pod's status."""
    from tether.lab.cluster import wait_for
    from tether.lab.containerd import lab_pod_sandbox

    kube.apply(kubelet_pod_manifest(name, namespace, host, labels, ports))

    def status() -> dict:
        pod = json.loads(kube.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout)
        return pod.get("status") or {}
    wait_for(lambda: status().get("phase") == "Running" and status().get("podIP"), timeout,
             f"pod {namespace}/{name} Running on {host} (kubectl describe pod -n {namespace} {name})")
    st = status()
    found = lab_pod_sandbox(lab.dir, host, namespace, name)
    if found is None:
        raise RuntimeError(f"pod {namespace}/{name} runs but containerd made no CNI ADD for it on {host}")
    sandbox, ns = found
    return PodInfo(name=name, host=host, ns=ns, network=LAB_NETWORK, namespace=namespace, container_id=sandbox,
                   ips=[i["ip"] for i in st.get("podIPs") or []], labels=labels or {})


def report_pod_status(kube: KubeApi, namespace: str, name: str, ips: list[str]) -> None:
    """Kubelet's status update after the sandbox is up: phase Running, Ready, status.podIP(s)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
              "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}
    kube.kubectl("patch", "pod", "-n", namespace, name, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))


def sync_endpoint_slice(kube: KubeApi, namespace: str, service: str) -> list[str]:
    """What kube-controller-manager's EndpointSlice controller does for a Service with a selector
    (the lab runs no controller manager): one slice, `<service>-tether`, with the ready addresses
    of the running pods the selector matches. Call it after pods change; returns the addresses."""
    svc = json.loads(kube.kubectl("get", "svc", "-n", namespace, service, "-o", "json").stdout)
    selector = (svc.get("spec") or {}).get("selector") or {}
    if not selector:
        raise ValueError(f"service {namespace}/{service} has no selector: write its EndpointSlices yourself")
    sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", sel, "-o", "json").stdout)["items"]
    endpoints = [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                  "nodeName": p["spec"].get("nodeName"),
                  "targetRef": {"kind": "Pod", "namespace": namespace, "name": p["metadata"]["name"],
                                "uid": p["metadata"]["uid"]}}
                 for p in pods if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")]
    named = {cp["name"]: cp["containerPort"] for p in pods for c in p["spec"]["containers"]
             for cp in c.get("ports") or [] if cp.get("name")}  # one slice: a name means one number here

    def target(sp: dict) -> int:
        t = sp.get("targetPort", sp["port"])
        return t if isinstance(t, int) else named.get(t, sp["port"])
    ports = [{"name": sp.get("name") or "", "port": target(sp), "protocol": sp.get("protocol") or "TCP"}
             for sp in svc["spec"].get("ports") or []]
    kube.apply(json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{service}-tether", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "lab.tether.dev"}},
        "ports": ports, "endpoints": endpoints}))
    return sorted(e["addresses"][0] for e in endpoints)


HOST_PORT = 6443  # where the apiserver answers inside each lab host (relayed to the root namespace's loopback)


def host_kubeconfig(lab: Lab, kube: KubeApi) -> str:
    """A kubeconfig that works inside the lab's hosts: each host namespace has its own loopback, so
    socat relays 127.0.0.1:6443 there through a unix socket to the apiserver's loopback port (only
    loopback and files: nothing leaves the machine). Started once; the relays' PIDs go in the
    lab's state and `lab down` stops them."""
    path = os.path.join(kube.dir, "kubeconfig-hosts")
    if os.path.exists(path):
        return path
    sock = os.path.join(kube.dir, "apiserver.sock")
    procs = [subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,unlink-early", f"TCP:127.0.0.1:{kube.port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    for h in lab.state.hosts:
        procs.append(subprocess.Popen(["ip", "netns", "exec", h.ns, "socat",
                                       f"TCP-LISTEN:{HOST_PORT},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{sock}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    lab.state.kube_pids += [p.pid for p in procs]
    lab.save()
    with open(kube.kubeconfig) as f, open(path, "w") as out:
        out.write(f.read().replace(kube.url, f"https://127.0.0.1:{HOST_PORT}"))
    for h in lab.state.hosts:
        from tether.lab.cluster import port_open, wait_for

        wait_for(lambda h=h: port_open(h.ns, "127.0.0.1", HOST_PORT), 10, f"the apiserver relay in {h.name}")
    return path


def start_controller(lab: Lab, kube: KubeApi, log_name: str = "kube.log", stats_file: str | None = None,
                     identity: str = "c1", lease_duration: int = 4) -> subprocess.Popen:
    """`tether kube` against the lab's server (unix socket) and the given apiserver."""
    return spawn_controller(kube, f"unix://{lab.server_socket}", os.path.join(lab.dir, "server", "token"),
                            os.path.join(lab.dir, log_name), stats_file, identity, lease_duration)


def spawn_controller(kube: KubeApi, server: str, token_file: str, log_path: str, stats_file: str | None = None,
                     identity: str = "c1", lease_duration: int = 4) -> subprocess.Popen:
    args = [sys.executable, "-m", "tether.kube.controller", "--kubeconfig", kube.kubeconfig,
            "--server", server, "--token-file", token_file, "--identity", identity,
            "--lease-duration", str(lease_duration)]
    if stats_file:
        args += ["--stats-file", stats_file]
    return subprocess.Popen(args, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


LAB_NETWORK = "pods"  # the network `tether lab up --kubernetes` makes for pods (the hosts' CNI config names it)


def lab_kube_api(lab: Lab) -> KubeApi:
    """The lab's control plane, as `lab_kubernetes` left it (its settings are in <lab>/kube/api.json)."""
    with open(os.path.join(lab.dir, "kube", "api.json")) as f:
        d = json.load(f)
    return KubeApi(**d)


def lab_kubernetes(lab: Lab, kubelet: str | None = None, progress=print) -> str:
    """`tether lab up --kubernetes`: etcd + kube-apiserver on loopback, a Node per host, the pod
    network, and `tether kube`; their PIDs go in the lab's state (stopped by `lab down`). With
    `kubelet` (its binary), a private containerd and that kubelet on every host too
    (tether.lab.containerd.start_lab_nodes). Returns the kubeconfig path."""
    from tether.model import Network, Subnet

    k = KubeApi(os.path.join(lab.dir, "kube"), k8s_bin())
    try:
        k.start()
    finally:
        lab.state.kube_pids = [p.pid for p in (k.apiserver, k.etcd) if p is not None]
        lab.save()
    with open(os.path.join(k.dir, "api.json"), "w") as f:
        json.dump({f: getattr(k, f) for f in ("dir", "bin", "token", "port", "etcd_port", "etcd_peer", "prefix")}, f)
    k.apply(node_manifest(lab))
    if LAB_NETWORK not in {n.name for n in lab.client().list("Network")}:
        lab.client().create_network(Network(name=LAB_NETWORK, subnets=[Subnet(cidr="10.244.0.0/16")]))
    c = start_controller(lab, k)
    lab.state.kube_pids.insert(0, c.pid)
    lab.save()
    if kubelet:
        from tether.lab.containerd import start_lab_nodes

        start_lab_nodes(lab, k, kubelet, progress)
    return k.kubeconfig
