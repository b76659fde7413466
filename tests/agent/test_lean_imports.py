"""The agent imports only the parts of pyroute2 and httpx it uses (issue 29: an agent's memory is
mostly its imports), and both libraries still work in full for code that asks for more."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import tether.agent.main, tether.dataplane.links, tether.dataplane.pods
heavy = sorted(m for m in ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ethtool", "pyroute2.nslink", "rich",
                           "click", "pygments") if m in sys.modules)
print("heavy", heavy)
import pyroute2
from pyroute2.iproute import IPRoute
from pyroute2 import NDB, IPRoute as Top
assert Top is IPRoute and pyroute2.IPRoute is IPRoute and NDB.__name__ == "NDB"
print("whole", "pyroute2.ndb" in sys.modules)
"""


def test_the_agent_leaves_unused_parts_of_pyroute2_and_httpx_unimported_yet_available() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "heavy []" in out.stdout, out.stdout
    assert "whole True" in out.stdout, out.stdout
