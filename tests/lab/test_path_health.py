"""Path health (issue 25): agents check their peers over the underlay and the overlay and report it;
`tether status --peers` shows the matrix; a path whose underlay MTU was lowered is reported with
the network whose packets no longer fit, before users see stalled TCP; VXLAN blocked between two
hosts whose underlay still answers is reported as the overlay down."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, nsx, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


def peers(lab: Lab) -> dict:
    return lab.client().request("GET", "/api/v1/peers")


def path(lab: Lab, src: str, dst: str) -> dict | None:
    r = peers(lab).get(src)
    return next((p for p in (r or {}).get("peers", []) if p["peer"] == dst), None)


def test_peers_are_checked_and_a_lowered_underlay_mtu_is_reported(fresh_lab: Lab) -> None:
    lab = fresh_lab
    net = unique("n")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.48.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "a", net)
    lab.run_pod("h3", "b", net)
    lab.run_pod("h2", "c", net)  # the overlay is checked between hosts that each own a VXLAN block

    def all_ok() -> bool:
        p = path(lab, "h1", "h3")
        return p is not None and p["path_mtu"] == 1500 and not p["problems"]

    try:
        wait_for(all_ok, 40, "h1's first healthy report on h3")
    except TimeoutError:
        raise AssertionError(f"h1 -> h3: {path(lab, 'h1', 'h3')}") from None
    # Each agent reports on its own timer: h1's first report says nothing about when h2 and h3 report.
    wait_for(lambda: set(peers(lab)) == {"h1", "h2", "h3"}, 40, "every host's first report")
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "status", "--peers", "--server", lab.server_url,
                        "--token", lab.token], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mtu 1500" in r.stdout and "h3" in r.stdout, r.stdout + r.stderr

    # the overlay: through h1's VTEP to h3's; then VXLAN blocked on the underlay router between them
    p = path(lab, "h1", "h3")
    assert p is not None and p["overlay"]["ok"] and p["overlay"]["size"] == 1450, p
    assert "vxlan" in r.stdout, r.stdout
    table = unique("novx")
    h1, h3 = lab.host("h1").ip, lab.host("h3").ip
    subprocess.run(["ip", "netns", "exec", lab.ul, "nft", "-f", "-"], check=True, text=True,
                   input=f"table ip {table} {{\n chain f {{\n type filter hook forward priority 0;\n"
                         f" ip saddr {h1} ip daddr {h3} udp dport 4789 drop\n"
                         f" ip saddr {h3} ip daddr {h1} udp dport 4789 drop\n }}\n}}\n")
    try:
        wait_for(lambda: not (path(lab, "h1", "h3") or {}).get("overlay", {}).get("ok", True), 40,
                 "h1 to report the overlay to h3 down")
        p = path(lab, "h1", "h3")
        assert p is not None and p["underlay"]["ok"] and any("not through the overlay" in m for m in p["problems"]), p
        assert (path(lab, "h1", "h2") or {}).get("overlay", {}).get("ok"), "a path that was not blocked"
        r = subprocess.run([sys.executable, "-m", "tether.cli.main", "status", "--peers", "--server", lab.server_url,
                            "--token", lab.token], capture_output=True, text=True, timeout=60)
        assert "vxlan DOWN" in r.stdout, r.stdout
    finally:
        subprocess.run(["ip", "netns", "exec", lab.ul, "nft", "delete", "table", "ip", table], check=False)
    wait_for(lambda: (path(lab, "h1", "h3") or {}).get("overlay", {}).get("ok"), 40, "the overlay to h3 back")

    nsx(lab.ul, "ip", "link", "set", "ph3", "mtu", "1400")  # the underlay's port towards h3 (lab namespace)
    wait_for(lambda: (path(lab, "h1", "h3") or {}).get("path_mtu") not in (None, 1500), 40,
             "h1 to report the smaller path to h3")
    p = path(lab, "h1", "h3")
    assert p is not None and 1380 <= p["path_mtu"] <= 1400, p
    assert any(net in msg and "carries" in msg for msg in p["problems"]), p["problems"]
    assert (path(lab, "h1", "h2") or {}).get("path_mtu") == 1500, "a path that did not change"
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "status", "--peers", "--server", lab.server_url,
                        "--token", lab.token], capture_output=True, text=True, timeout=60)
    assert "problems:" in r.stdout and f"network {net}" in r.stdout, r.stdout
