"""podman (Debian's 4.3, CNI backend) runs containers on a Tether network inside a lab host; a pod on
another host reaches them; removing a container releases its address.

Set-up follows docs/RUNTIMES.md: a private containers.conf selecting the CNI backend and
the lab's plugin directory, private storage, runc (crun refuses this machine's hybrid cgroups), and
`nsenter --net=` so podman sees the lab host's network namespace but keeps the machine's mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import Lab, nsx, sh, wait_for
from tether.model import Network, Subnet

pytestmark = [pytest.mark.lab, pytest.mark.client]

IMAGE = "localhost/tether-busybox:latest"


class Podman:
    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab, self.root = lab, root
        (root / "netd").mkdir(parents=True)
        (root / "containers.conf").write_text(f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{lab.dir}/cni-bin", "/usr/lib/cni"]
network_config_dir = "{root}/netd"
""")
        (root / "storage.conf").write_text(f"""[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/run"
""")
        self.env = {**os.environ, "CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}

    def __call__(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.lab.host(host).ns}", "podman", *args],
                           capture_output=True, text=True, env=self.env, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def network(self, name: str, version: str, host: str) -> None:
        conflist = {"cniVersion": version, "name": name,
                    "plugins": [{"type": "tether", "network": name, "agent_socket": self.lab.cni_socket(host),
                                 "capabilities": {"portMappings": True}}]}  # podman -p: runtimeConfig.portMappings
        (self.root / "netd" / f"{name}.conflist").write_text(json.dumps(conflist))

    def import_busybox(self) -> None:
        img = self.root / "img"
        (img / "bin").mkdir(parents=True)
        shutil.copy(shutil.which("busybox") or "/bin/busybox", img / "bin" / "busybox")
        for tool in ("sh", "httpd", "sleep", "ip", "ping", "wget"):
            (img / "bin" / tool).symlink_to("busybox")
        (img / "www").mkdir()
        (img / "www" / "index.html").write_text("hello from podman\n")
        sh("tar", "-C", str(img), "-cf", str(self.root / "busybox.tar"), ".")
        r = subprocess.run(["podman", "import", str(self.root / "busybox.tar"), IMAGE], capture_output=True,
                           text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stderr

    def cleanup(self, host: str) -> None:
        self(host, "rm", "-af", "-t", "0", check=False)
        subprocess.run(["podman", "system", "reset", "-f"], capture_output=True, env=self.env, timeout=120)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mnt = line.split()[1]
            if mnt.startswith(str(self.root)):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[tuple[Lab, Podman]]:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are needed (scripts/install-deps installs them)")
    lab = make_lab(hosts=2)
    pm = Podman(lab, tmp_path_factory.mktemp("podman") / unique("pm"))
    try:
        pm.import_busybox()
        yield lab, pm
    finally:
        pm.cleanup("h1")
        lab.down()


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])  # podman's CNI library stops at 1.0.0
def test_a_podman_container_is_reachable_from_a_pod_on_another_host(env: tuple[Lab, Podman], version: str) -> None:
    lab, pm = env
    net = unique("pm")
    cidr = "10.81.0.0/16" if version == "1.0.0" else "10.82.0.0/16"
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr=cidr)], encap="vxlan"))
    pm.network(net, version, "h1")
    static = cidr.replace("0.0/16", "7.7")
    name = unique("web")
    pm("h1", "run", "-d", "--name", name, "--network", net, "--ip", static, IMAGE,
       "httpd", "-f", "-p", "80", "-h", "/www")
    ip = pm("h1", "inspect", name, "--format", f"{{{{.NetworkSettings.Networks.{net}.IPAddress}}}}").stdout.strip()
    assert ip == static
    # the container's resolv.conf comes from the CNI result's dns (the image has no cat)
    resolv = pm("h1", "exec", name, "sh", "-c", "while read -r l; do echo \"$l\"; done < /etc/resolv.conf").stdout
    assert "nameserver 169.254.20.10" in resolv and f"default.svc.tether.local svc.tether.local {net}." in resolv, \
        resolv

    [ep] = [e for e in lab.client().list("Endpoint") if e.network == net]
    assert ep.name == name and ep.host == "h1" and ep.ips == [static] and ep.owner.type == "cni"

    pod = lab.run_pod("h2", unique("p"), net)
    try:
        assert lab.reaches(f"h2/{pod.name}", ip)
        page = lab.exec(f"h2/{pod.name}", "curl", "-s", "-m", "5", f"http://{ip}/")
        assert page.stdout == "hello from podman\n", page.stderr
        pm("h1", "rm", "-f", "-t", "0", name)
        wait_for(lambda: not [e for e in lab.client().list("Endpoint") if e.network == net and e.host == "h1"], 10,
                 "podman rm to delete the endpoint")
        assert not any(static in b.allocations for b in lab.client().list("Block"))
    finally:
        lab.rm_pod(f"h2/{pod.name}")


def test_podman_publish_is_reachable_on_the_containers_host_only(env: tuple[Lab, Podman]) -> None:
    """podman -p (CNI portMappings, with the host's own credential): published on h1's address, not
    h2's; the same host port again on h1 is refused with the reason; podman rm unpublishes it."""
    lab, pm = env
    net = unique("pmp")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.83.0.0/16")]))
    pm.network(net, "1.0.0", "h1")
    name = unique("pub")
    pm("h1", "run", "-d", "--name", name, "--network", net, "-p", "8081:80", IMAGE, "httpd", "-f", "-p", "80",
       "-h", "/www")

    def page(host: str) -> str:
        return nsx(lab.inet, "curl", "-s", "-m", "2", f"http://{lab.host(host).ip}:8081/", check=False).stdout

    wait_for(lambda: page("h1") == "hello from podman\n", 20, "port 8081 on h1")
    assert page("h2") == ""
    clash = pm("h1", "run", "-d", "--name", unique("clash"), "--network", net, "-p", "8081:80", IMAGE, "sleep", "60",
               check=False)
    assert clash.returncode != 0 and "already published" in clash.stderr, clash.stderr
    pm("h1", "rm", "-f", "-t", "0", name)
    wait_for(lambda: not [s for s in lab.client().list("Service") if s.name.startswith("cni-")], 20,
             "podman rm to unpublish the port")
    assert page("h1") == ""
