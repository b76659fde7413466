"""Flow records name the endpoints involved, from the replica as of the last apply."""

from __future__ import annotations

from tether.agent.flowlog import FlowLog
from tether.calc.replica import Replica
from tether.model import Endpoint


def test_names_follow_the_replica_and_are_built_only_when_asked():
    rep = Replica()
    web = Endpoint(id="w", name="web", namespace="prod", network="n", ips=["10.1.0.5", "fd00::5"])
    rep.objects["Endpoint"][web.id] = web
    flows = FlowLog("h1", "/nonexistent/flows.sock")
    flows.update(rep)
    assert flows._names is None  # nothing built until a record needs a name
    assert flows.name("10.1.0.5") == flows.name("fd00::5") == "prod/web"
    assert flows.name("10.1.0.6") == ""
    del rep.objects["Endpoint"][web.id]  # the replica changes after the apply: names stay as applied
    assert flows.name("10.1.0.5") == "prod/web"
    flows.update(rep)
    assert flows.name("10.1.0.5") == ""
