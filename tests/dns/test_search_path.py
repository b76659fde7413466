"""Pods get the Kubernetes-style search path (NAMESPACE.svc.DOMAIN svc.DOMAIN NETWORK.DOMAIN DOMAIN,
ndots:5) in their CNI result, and `tether dns lookup` applies the same path, so `web` alone names
the service web in the pod's namespace."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from tests.fixtures.server import ServerProc, start_server
from tether.agent.main import Agent
from tether.calc.dns_records import candidates, search_path
from tether.cli.main import app
from tether.model import Network, Subnet


def test_search_path_is_namespace_services_then_all_services_then_network_then_domain() -> None:
    assert search_path("shop", "blue", "tether.local") == ["shop.svc.tether.local", "svc.tether.local",
                                                          "blue.tether.local", "tether.local"]


def test_short_names_try_the_search_domains_first_and_dotted_names_are_absolute() -> None:
    search = ["a.svc.d", "d"]
    assert candidates("web", search) == ["web.a.svc.d.", "web.d.", "web."]
    assert candidates("a.b.c.d.e.f", search)[0] == "a.b.c.d.e.f."
    assert candidates("web.", search) == ["web."]


def test_the_cni_result_carries_nameserver_search_path_and_ndots() -> None:
    agent = SimpleNamespace(dns_ip="169.254.20.10", dns_search=["corp.example"])
    net = Network(name="blue", subnets=[Subnet(cidr="10.1.0.0/16")], dns_domain="cl.local")
    assert Agent.dns_config(agent, net, "shop") == {  # type: ignore[arg-type]
        "nameservers": ["169.254.20.10"], "options": ["ndots:5"],
        "search": ["shop.svc.cl.local", "svc.cl.local", "blue.cl.local", "cl.local", "corp.example"]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("search-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"), "--service-cidr", "10.99.0.0/24")
    try:
        http = s.http()
        assert http.post("/api/v1/networks", json={"name": "blue", "subnets": [{"cidr": "10.83.0.0/16"}]}).is_success
        assert http.put("/api/v1/namespaces/shop", json={"name": "shop"}).is_success
        for ns in ("shop", "default"):
            assert http.put(f"/api/v1/namespaces/{ns}/services/web", json={
                "name": "web", "namespace": ns, "selector": {"app": "web"}, "ports": [{"port": 80}]}).is_success
        yield s
    finally:
        s.stop()


def lookup(srv: ServerProc, *args: str) -> dict:
    r = CliRunner().invoke(app, ["dns", "lookup", *args, "-o", "yaml", "--server", srv.url, "--token", srv.token])
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.output)


def test_dns_lookup_of_a_short_name_uses_the_namespace_search_path(srv: ServerProc) -> None:
    vip = {ns: srv.client().get("Service", f"{ns}/web").cluster_ip for ns in ("shop", "default")}
    shop = lookup(srv, "web", "-n", "shop")
    assert shop["query"] == "web.shop.svc.tether.local" and [a["data"] for a in shop["answers"]] == [vip["shop"]]
    dflt = lookup(srv, "web")
    assert [a["data"] for a in dflt["answers"]] == [vip["default"]]
    other = lookup(srv, "web.shop", "-n", "default")  # NAME.NAMESPACE through svc.DOMAIN
    assert [a["data"] for a in other["answers"]] == [vip["shop"]]
    assert lookup(srv, "nothere")["rcode"] == "NXDOMAIN"
