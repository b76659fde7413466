"""The web page `/ui` (issue 25) in a real headless browser (Debian's chromium): the topology shows
the lab's hosts and pods, the flow view a denied flow the test just made (highlighted, with its
policy), the policy view the enforcement status, and the trace view explains the denied
connection. Screenshots of each view go to $TETHER_UI_SHOTS (default /tmp/tether-ui-screenshots)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, wait_for
from tether.model import Network, NetworkPolicy, Subnet

pytestmark = pytest.mark.lab
SHOTS = os.environ.get("TETHER_UI_SHOTS", "/tmp/tether-ui-screenshots")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run scripts/install-deps (Debian package chromium)"
    return exe


def browse(url: str, shot: str | None = None) -> str:
    """The page's DOM after it loaded (and a screenshot of it), from a fresh headless chromium."""
    profile = tempfile.mkdtemp(prefix="tether-ui-chromium-")
    try:
        base = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=3000"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        if shot:
            os.makedirs(SHOTS, exist_ok=True)
            r = subprocess.run([*base, f"--screenshot={os.path.join(SHOTS, shot)}", url], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0 and os.path.getsize(os.path.join(SHOTS, shot)) > 1000, r.stderr[-2000:]
        return dom.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_web_page_shows_topology_flows_policies_and_a_trace(fresh_lab: Lab) -> None:
    lab = fresh_lab
    c = lab.client()
    net = unique("n")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.51.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "cli", net)
    db = lab.run_pod("h2", "db", net, labels={"app": "db"})
    c.apply(NetworkPolicy(name="deny-db", namespace="default",
                          spec={"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}))
    wait_for(lambda: c.request("GET", "/api/v1/programming/NetworkPolicy/default/deny-db")["programmed"], 20,
             "the policy on every host")
    probe = lab.exec("h1/cli", sys.executable, "-m", "tether.lab.probe", "once", db.ips[0], "5432", "TCP",
                     "--timeout", "1")
    assert not json.loads(probe.stdout)["reached"]
    wait_for(lambda: c.request("GET", "/api/v1/flows", params={"to": "default/db", "verdict": "deny"})["flows"], 20,
             "the denied flow at the server")
    ui = f"{lab.server_url}/ui"
    token = f"token={lab.token}"

    assert "<svg" not in browse(ui), "the page answered without a token"
    top = browse(f"{ui}?{token}", "topology.png")
    for h in ("h1", "h2", "h3"):
        assert f'data-host="{h}"' in top, top[:2000]
    assert 'data-pod="default/cli"' in top and 'data-pod="default/db"' in top and net in top
    # the live graph, drawn in the browser by d3 (Debian's libjs-d3, served by the server)
    assert 'id="graph-svg"' in top, "d3 drew no graph: is libjs-d3 installed (scripts/install-deps)?"
    for name in ("h1", "h2", "h3", "default/cli", "default/db", net):
        assert f'data-name="{name}"' in top, (name, top[-3000:])
    assert top.count('class="node pod"') == 2 and top.count("<line ") >= 4

    flows = browse(f"{ui}/flows?{token}&to=default/db", "flows.png")
    assert '<tr class="deny">' in flows and "default/deny-db" in flows and "default/cli" in flows, flows[-3000:]

    pols = browse(f"{ui}/policies?{token}", "policies.png")
    assert "default/deny-db" in pols and "enforced on 3/3 hosts" in pols and "default/db" in pols, pols[-3000:]

    tr = browse(f"{ui}/trace?{token}&src=default/cli&dst=default/db:5432/tcp", "trace.png")
    assert "DENIED at ingress policy" in tr and 'class="step fail"' in tr and "deny-db" in tr, tr[-3000:]
