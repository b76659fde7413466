"""Issue 23: what crosses the underlay between a host and the server is TLS. A sniffer on the lab's
underlay switch records an agent joining, registering, syncing, watching and creating a pod's
endpoint: no token (admin, bootstrap or host credential) and no API request appears in clear."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.fixtures.lab import unique
from tether.client import ApiError, TetherClient
from tether.lab.cluster import API_PORT, Lab, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


def sniff(lab: Lab, path: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", lab.ul, "tcpdump", "-i", "ul0", "-U", "-s", "0", "-w", path,
                          "tcp", "port", str(API_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)  # tcpdump is listening once it has opened the interface
    assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
    return p


def test_no_token_crosses_the_underlay_in_clear(lab: Lab, tmp_path) -> None:
    pcap = str(tmp_path / "underlay.pcap")
    net = unique("n")
    admin = lab.client()
    admin.create_network(Network(name=net, subnets=[Subnet(cidr="10.47.0.0/16")]))
    # h3 joins again under the sniffer: revoke, forget its credential, restart with the bootstrap token
    lab.kill_agent("h3")
    admin.request("DELETE", "/api/v1/hosts/h3/credential")
    os.unlink(os.path.join(lab.agent_dir("h3"), "credential"))
    sniffer = sniff(lab, pcap)
    try:
        lab.start_agent("h3")
        lab.run_pod("h3", unique("p"), net)
        lab.run_pod("h1", unique("p"), net)
        time.sleep(6)  # a heartbeat and a watch bookmark too
    finally:
        sniffer.send_signal(signal.SIGINT)
        sniffer.wait(10)
    with open(pcap, "rb") as f:
        wire = f.read()
    assert len(wire) > 20_000, "the sniffer saw too little: the agents' traffic did not cross the underlay"
    assert b"\x16\x03" in wire  # TLS handshake records
    secrets = {"admin token": lab.token, "bootstrap token": lab.state.bootstrap_token,
               "h1 credential": lab.credential("h1"), "h3 credential": lab.credential("h3")}
    for what, secret in secrets.items():
        assert secret and secret.encode() not in wire, f"the {what} crossed the underlay in clear"
    for clear in (b"Bearer", b"/api/v1/", b"HTTP/1.1"):
        assert clear not in wire


def test_an_agent_holds_its_own_credential_that_cannot_write_another_host(lab: Lab) -> None:
    path = os.path.join(lab.agent_dir("h1"), "credential")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    h1 = TetherClient(f"unix://{lab.server_socket}", lab.credential("h1"))
    assert {h.name for h in h1.list("Host")} >= {"h1", "h2", "h3"}
    with pytest.raises(ApiError) as e:
        h1.request("PUT", "/api/v1/hosts/h2/status", json={"problems": []})
    assert e.value.status == 403
    admin = lab.client()
    admin.create_network(Network(name="tlsadmin", subnets=[Subnet(cidr="10.59.0.0/24")]))
    try:
        with pytest.raises(ApiError) as e:  # not one the Docker driver made: only the admin may delete it
            h1.delete("Network", "tlsadmin")
        assert e.value.status == 403
    finally:
        admin.delete("Network", "tlsadmin")


def test_a_revoked_agent_is_locked_out_and_its_host_goes_dead(lab: Lab) -> None:
    admin = lab.client()
    before = lab.credential("h2")
    admin.request("DELETE", "/api/v1/hosts/h2/credential")
    with pytest.raises(ApiError) as e:
        TetherClient(f"unix://{lab.server_socket}", before).list("Network")
    assert e.value.status == 401
    log = os.path.join(lab.agent_dir("h2"), "agent.log")
    wait_for(lambda: "401" in open(log).read() or "revoked" in open(log).read(), 20, "the agent to be refused")
    # rejoin so the module's other tests keep a full lab
    lab.kill_agent("h2")
    os.unlink(os.path.join(lab.agent_dir("h2"), "credential"))
    lab.start_agent("h2")
    assert lab.credential("h2") != before
