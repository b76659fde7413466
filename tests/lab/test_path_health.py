"""Path health (issue 25): agents check their peers over the underlay and report it;
`tether status --peers` shows the matrix; a path whose underlay MTU was lowered is reported with
the network whose packets no longer fit, before users see stalled TCP."""

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
