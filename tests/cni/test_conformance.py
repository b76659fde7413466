"""CNI conformance: the real `tether-cni` executable, called as a runtime calls it (environment +
stdin), against real agents in a 2-host lab. Every command, every supported version, the error
codes of the specification, CNI_ARGS, and chaining with the reference `portmap` plugin."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import Lab, nsx, sh, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab

VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
CIDR = "10.50.0.0/16"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = make_lab(hosts=2)
    try:
        lab.client().create_network(Network(name="conf", subnets=[Subnet(cidr=CIDR)], encap="vxlan"))
        yield lab
    finally:
        lab.down()


class Sandbox:
    """A container's network namespace, named under the lab so `lab.down()` removes leftovers."""

    def __init__(self, lab: Lab, host: str = "h1") -> None:
        self.lab, self.host = lab, host
        self.name = f"{lab.name}-{host}-{unique('c')}"
        self.container_id = self.name
        sh("ip", "netns", "add", self.name)

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def cni(self, command: str, config: dict, ifname: str = "eth0", args: str = "",
            container_id: str | None = None, netns: str | None = None) -> tuple[int, dict]:
        code, out = self.lab.cni(self.host, command, config, container_id=self.container_id
                                 if container_id is None else container_id,
                                 netns=self.path if netns is None else netns, ifname=ifname, args=args)
        return code, (json.loads(out) if out.strip() else {})

    def gone(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def conf(version: str = "1.0.0", **extra) -> dict:
    return {"cniVersion": version, "name": "conf", "type": "tether", **extra}


def endpoints(lab: Lab, container_id: str) -> list:
    return [e for e in lab.client().list("Endpoint") if e.owner.container_id == container_id]


def allocated(lab: Lab, ip: str) -> bool:
    return any(ip in b.allocations for b in lab.client().list("Block"))


def host_links(lab: Lab, host: str) -> str:
    return nsx(lab.host(host).ns, "ip", "-o", "link", "show").stdout


def link_names(lab: Lab, host: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in host_links(lab, host).splitlines()}


def error(code: int, body: dict, expected: int) -> str:
    assert code != 0, body
    assert body.get("code") == expected, body
    assert len(body.get("msg", "")) > 10, body  # a message a person can act on
    return body["msg"]


# --- VERSION ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_version_lists_every_supported_version(lab: Lab, version: str) -> None:
    sb = Sandbox(lab)
    try:
        code, body = sb.cni("VERSION", {"cniVersion": version})
        assert code == 0
        assert body["cniVersion"] == version
        assert set(VERSIONS) <= set(body["supportedVersions"])
    finally:
        sb.gone()


def test_the_plugin_runs_on_the_base_interpreter_with_builtins_only(lab: Lab) -> None:
    """Start-up is most of a call: no virtualenv (pyvenv.cfg lookups), no site, no `os` import."""
    with open(os.path.join(lab.dir, "cni-bin", "tether"), "rb") as f:
        shebang = f.readline().decode().split()
    interpreter = os.path.realpath(shebang[0][2:])
    assert shebang[1] == "-IS"
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(interpreter)), "pyvenv.cfg"))
    with open(os.path.join(lab.dir, "cni-bin", "tether")) as f:
        tree = ast.parse(f.read().split("\n", 1)[1])
    top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    assert top == {"_socket", "posix", "sys"}
    assert not any(isinstance(node, ast.ImportFrom) for node in tree.body)


# --- ADD / CHECK / DEL in every version -----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_in_each_version(lab: Lab, version: str) -> None:
    sb, peer = Sandbox(lab), None
    try:
        code, res = sb.cni("ADD", conf(version))
        assert code == 0, res
        assert res["cniVersion"] == version  # answered in the version it was called with
        ip = res["ips"][0]["address"].split("/")[0]
        assert ("version" in res["ips"][0]) == (version < "1.0.0")  # 0.x results carry "version": "4"
        assert res["interfaces"][res["ips"][0]["interface"]]["sandbox"] == sb.path
        assert f"inet {ip}/32" in nsx(sb.name, "ip", "-o", "addr", "show", "eth0").stdout
        # real packets: a pod on the other host reaches it
        peer = lab.run_pod("h2", unique("p"), "conf")
        assert lab.reaches(f"h2/{peer.name}", ip)

        if version >= "0.4.0":  # CHECK exists from 0.4.0
            assert sb.cni("CHECK", conf(version, prevResult=res))[0] == 0
            nsx(sb.name, "ip", "addr", "del", f"{ip}/32", "dev", "eth0")
            code, body = sb.cni("CHECK", conf(version, prevResult=res))
            assert code != 0 and ip in body["msg"], body

        host_if = res["interfaces"][0]["name"]
        assert host_if in host_links(lab, "h1")
        assert sb.cni("DEL", conf(version, prevResult=res))[0] == 0
        assert host_if not in host_links(lab, "h1")
        assert not allocated(lab, ip) and not endpoints(lab, sb.container_id)
        assert sb.cni("DEL", conf(version, prevResult=res))[0] == 0  # twice: still fine
    finally:
        if peer:
            lab.rm_pod(f"h2/{peer.name}")
        sb.gone()


def test_del_of_an_unknown_container_succeeds(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        assert sb.cni("DEL", conf(), container_id="never-added-" + sb.name)[0] == 0
    finally:
        sb.gone()


def test_del_after_the_netns_is_gone_releases_everything(lab: Lab) -> None:
    sb = Sandbox(lab)
    code, res = sb.cni("ADD", conf())
    assert code == 0, res
    ip, host_if = res["ips"][0]["address"].split("/")[0], res["interfaces"][0]["name"]
    sb.gone()  # the runtime lost the namespace first (e.g. the container crashed and was cleaned up)
    assert sb.cni("DEL", conf())[0] == 0
    assert not allocated(lab, ip) and not endpoints(lab, sb.container_id)
    assert host_if not in host_links(lab, "h1")
    assert sb.cni("DEL", conf(), netns="")[0] == 0  # a runtime may pass no netns at all


def test_check_of_an_unknown_container_is_code_3(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        prev = {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
        error(*sb.cni("CHECK", conf(prevResult=prev)), 3)
    finally:
        sb.gone()


# --- STATUS and GC (1.1.0) -------------------------------------------------------------------------


def test_status_is_ok_with_an_agent_and_50_without(lab: Lab) -> None:
    sb = Sandbox(lab, "h2")
    try:
        assert sb.cni("STATUS", conf("1.1.0")) == (0, {})
        error(*sb.cni("STATUS", conf("1.0.0")), 1)  # STATUS does not exist before 1.1.0
        lab.kill_agent("h2")
        try:
            msg = error(*sb.cni("STATUS", conf("1.1.0")), 50)
            assert "tether agent" in msg.lower()
            msg = error(*sb.cni("ADD", conf("1.1.0")), 11)
            assert "try again later" in msg
        finally:
            lab.start_agent("h2")
        wait_for(lambda: sb.cni("STATUS", conf("1.1.0"))[0] == 0, 20, "STATUS to succeed again")
    finally:
        sb.gone()


def test_gc_removes_attachments_that_are_not_valid(lab: Lab) -> None:
    boxes = [Sandbox(lab) for _ in range(3)]
    try:
        results = []
        for sb in boxes:
            code, res = sb.cni("ADD", conf("1.1.0"))
            assert code == 0, res
            results.append(res)
        keep = boxes[0]
        valid = [{"containerID": keep.container_id, "ifname": "eth0"}]
        assert boxes[0].cni("GC", conf("1.1.0", **{"cni.dev/valid-attachments": valid}))[0] == 0
        for sb, res in zip(boxes, results, strict=True):
            ip, host_if = res["ips"][0]["address"].split("/")[0], res["interfaces"][0]["name"]
            kept = sb is keep
            assert allocated(lab, ip) == kept, sb.name
            assert bool(endpoints(lab, sb.container_id)) == kept, sb.name
            assert (host_if in host_links(lab, "h1")) == kept, sb.name
        peer = lab.run_pod("h2", unique("p"), "conf")
        try:
            assert lab.reaches(f"h2/{peer.name}", results[0]["ips"][0]["address"].split("/")[0])
        finally:
            lab.rm_pod(f"h2/{peer.name}")
    finally:
        for sb in boxes:
            sb.cni("DEL", conf("1.1.0"))
            sb.gone()


# --- error codes ----------------------------------------------------------------------------------


def run_plugin(lab: Lab, env: dict, stdin: bytes) -> tuple[int, dict]:
    """Raw invocation, for environments and inputs `Lab.cni` would not produce."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TETHER_CNI_SOCKET": lab.cni_socket("h1"), **env}
    r = subprocess.run([os.path.join(lab.dir, "cni-bin", "tether")], input=stdin, capture_output=True, env=env,
                       timeout=60)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}


def test_error_codes_of_the_specification(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        assert "0.2.0" in error(*sb.cni("ADD", conf("0.2.0")), 1)
        assert "bogus" in error(*sb.cni("ADD", conf(bogus=1)), 2)
        gone = f"/var/run/netns/{sb.name}-missing"
        assert gone in error(*sb.cni("ADD", conf(), netns=gone), 3)
        env = {"CNI_COMMAND": "ADD", "CNI_NETNS": sb.path, "CNI_IFNAME": "eth0"}
        assert "CNI_CONTAINERID" in error(*run_plugin(lab, env, json.dumps(conf()).encode()), 4)
        assert "junk" in error(*sb.cni("ADD", conf(), args="junk"), 4)
        assert "JSON" in error(*run_plugin(lab, {**env, "CNI_CONTAINERID": "x1"}, b"{not json"), 6)
        assert "cniVersion" in error(*sb.cni("ADD", {"name": "conf", "type": "tether"}), 7)
        assert "no-such-net" in error(*sb.cni("ADD", conf(network="no-such-net")), 7)
        assert not endpoints(lab, sb.container_id)
    finally:
        sb.gone()


def test_an_io_failure_is_code_5_and_leaks_nothing(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        nsx(sb.name, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "taken0")  # the name is taken
        # allocations, not blocks: an ADD may claim the host's first block, which stays (affinity)
        before = {b.cidr: dict(b.allocations) for b in lab.client().list("Block") if b.allocations}
        links_before = link_names(lab, "h1")
        error(*sb.cni("ADD", conf()), 5)
        assert not endpoints(lab, sb.container_id)
        after = {b.cidr: dict(b.allocations) for b in lab.client().list("Block") if b.allocations}
        assert after == before
        assert link_names(lab, "h1") == links_before
    finally:
        sb.gone()


# --- CNI_ARGS ---------------------------------------------------------------------------------------


def test_cni_args_name_namespace_labels_and_static_ip(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        args = "IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;IP=10.50.200.9"
        code, res = sb.cni("ADD", conf(labels={"app": "web"}), args=args)
        assert code == 0, res
        assert res["ips"][0]["address"] == "10.50.200.9/32"
        [ep] = endpoints(lab, sb.container_id)
        assert (ep.name, ep.namespace, ep.labels["app"], ep.ips) == ("web-0", "shop", "web", ["10.50.200.9"])
        assert "10.50.200.9/32" in nsx(sb.name, "ip", "-o", "addr", "show", "eth0").stdout
        # the same static address for another container is refused, clearly; the veth the agent
        # made while the server was deciding is gone again
        other = Sandbox(lab)
        try:
            links_before = link_names(lab, "h1")
            msg = error(*other.cni("ADD", conf(), args="IP=10.50.200.9"), 7)
            assert "10.50.200.9" in msg
            assert link_names(lab, "h1") == links_before
            assert len(nsx(other.name, "ip", "-o", "link", "show").stdout.splitlines()) == 1  # only lo
        finally:
            other.gone()
        assert sb.cni("DEL", conf())[0] == 0
    finally:
        sb.gone()


# --- chaining -------------------------------------------------------------------------------------


def test_prev_result_is_passed_on(lab: Lab) -> None:
    sb = Sandbox(lab)
    try:
        prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "earlier0"}],
                "ips": [{"address": "192.0.2.7/24", "interface": 0}], "routes": [{"dst": "192.0.2.0/24"}]}
        code, res = sb.cni("ADD", conf(prevResult=prev))
        assert code == 0, res
        assert res["interfaces"][0] == {"name": "earlier0"} and len(res["interfaces"]) == 3
        assert res["ips"][0]["address"] == "192.0.2.7/24"
        assert res["ips"][1]["interface"] == 2 and res["interfaces"][2]["name"] == "eth0"
        assert {"dst": "192.0.2.0/24"} in res["routes"]
        assert sb.cni("DEL", conf(prevResult=res))[0] == 0
    finally:
        sb.gone()


PORTMAP = "/usr/lib/cni/portmap"


def test_chained_with_the_reference_portmap_plugin(lab: Lab) -> None:
    """A conflist [tether, portmap]: the runtime passes tether's result to portmap as prevResult; the
    published host port then reaches the pod from the other host."""
    if not os.access(PORTMAP, os.X_OK):
        pytest.skip("containernetworking-plugins' portmap is not installed")
    sb = Sandbox(lab)
    web = None
    try:
        code, res = sb.cni("ADD", conf())
        assert code == 0, res
        ip = res["ips"][0]["address"].split("/")[0]
        mappings = [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]
        pm_conf = {"cniVersion": "1.0.0", "name": "conf", "type": "portmap", "capabilities": {"portMappings": True},
                   "runtimeConfig": {"portMappings": mappings}, "prevResult": res}
        h = lab.host("h1")
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": sb.container_id, "CNI_NETNS": sb.path, "CNI_IFNAME": "eth0",
               "CNI_PATH": "/usr/lib/cni", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        r = subprocess.run(["ip", "netns", "exec", h.ns, PORTMAP], input=json.dumps(pm_conf), capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        chained = json.loads(r.stdout)
        assert chained["ips"] == res["ips"]  # portmap passes tether's result on
        web = subprocess.Popen(["ip", "netns", "exec", sb.name, "python3", "-m", "http.server", "8080",
                                "--bind", ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        other = lab.host("h2")
        wait_for(lambda: nsx(other.ns, "curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}",
                             f"http://{h.ip}:18080/", check=False).stdout == "200", 20,
                 "the published port to answer from the other host")
        r = subprocess.run(["ip", "netns", "exec", h.ns, PORTMAP], input=json.dumps(pm_conf), capture_output=True,
                           text=True, env={**env, "CNI_COMMAND": "DEL"}, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sb.cni("DEL", conf(prevResult=res))[0] == 0
    finally:
        if web:
            web.kill()
            web.wait()
        sb.gone()
