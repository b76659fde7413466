"""`tether get -o yaml|json` prints documents (apiVersion, kind, metadata, spec) that `tether apply -f`
takes back unchanged, for every Tether kind, against a real server: applying them again writes
nothing (the store's revision stays), and an edited document changes only what it edits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from typer.testing import CliRunner

from tests.fixtures.server import ServerProc, start_server
from tether.cli.main import app
from tether.model import KINDS, NEUTRON_ONLY_KINDS, PLURALS

runner = CliRunner()


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("docs-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"))
    try:
        http = s.http()
        for r in (
            http.put("/api/v1/hosts/h1", json={"name": "h1", "underlay_ip": "198.18.0.1",
                                               "underlay_cidr": "198.18.0.0/24", "labels": {"rack": "a"}}),
            http.post("/api/v1/networks", json={"name": "blue", "subnets": [{"cidr": "10.77.0.0/16"}],
                                                "nat_outgoing": True, "labels": {"team": "x"}}),
            http.put("/api/v1/namespaces/shop", json={"name": "shop", "labels": {"env": "prod"}}),
            http.post("/api/v1/endpoints", json={"name": "web", "network": "blue", "host": "h1",
                                                 "namespace": "shop", "labels": {"app": "web"}}),
            http.put("/api/v1/namespaces/shop/networkpolicies/deny", json={
                "name": "deny", "namespace": "shop", "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
            http.post("/api/v1/securitygroups", json={"name": "ssh", "rules": [
                {"direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
                 "remote_ip_prefix": "192.0.2.0/24"}]}),
            http.put("/api/v1/namespaces/shop/services/web", json={
                "name": "web", "namespace": "shop", "selector": {"app": "web"}, "ports": [{"port": 80}]}),
        ):
            assert r.status_code < 300, r.text
        yield s
    finally:
        s.stop()


def cli(srv: ServerProc, *args: str, stdin: str | None = None):
    return runner.invoke(app, [*args, "--server", srv.url, "--token", srv.token], input=stdin)


def store_revision(srv: ServerProc) -> int:
    return srv.http().get("/api/v1/snapshot").json()["revision"]


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(NEUTRON_ONLY_KINDS)))
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_get_output_applies_back_unchanged(srv: ServerProc, kind: str, fmt: str) -> None:
    got = cli(srv, "get", PLURALS[kind], "-o", fmt)
    assert got.exit_code == 0, got.output
    listed = yaml.safe_load(got.output)  # JSON is YAML
    assert listed["kind"] == "List" and listed["items"], f"no {kind} to round-trip"
    for doc in listed["items"]:
        assert doc["apiVersion"] == "tether.dev/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    before = store_revision(srv)
    applied = cli(srv, "apply", "-f", "-", stdin=got.output)
    assert applied.exit_code == 0, applied.output
    assert all(line.endswith(" unchanged") for line in applied.output.splitlines()), applied.output
    assert store_revision(srv) == before
    again = cli(srv, "get", PLURALS[kind], "-o", fmt)
    assert yaml.safe_load(again.output) == listed


def test_one_object_round_trips_and_an_edit_changes_only_it(srv: ServerProc) -> None:
    got = cli(srv, "get", "network", "blue", "-o", "yaml")
    doc = yaml.safe_load(got.output)
    assert set(doc) >= {"apiVersion", "kind", "metadata", "spec"} and doc["spec"]["nat_outgoing"] is True
    assert "unchanged" in cli(srv, "apply", "-f", "-", stdin=got.output).output
    doc["metadata"]["labels"]["team"] = "y"
    r = cli(srv, "apply", "-f", "-", stdin=yaml.safe_dump(doc))
    assert r.exit_code == 0 and "network/blue configured (labels)" in r.output, r.output
    assert srv.client().get("Network", "blue").labels == {"team": "y"}


def test_a_hand_written_endpoint_document_is_matched_by_name(srv: ServerProc) -> None:
    doc = ("apiVersion: tether.dev/v1\nkind: Endpoint\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
           "spec: {network: blue}\n")
    r = cli(srv, "apply", "-f", "-", stdin=doc)
    assert r.exit_code == 0 and "endpoint/web unchanged" in r.output, r.output
    r = cli(srv, "apply", "-f", "-", stdin=doc.replace("app: web", "app: shop"))
    assert "endpoint/web configured (labels)" in r.output, r.output
    assert [e.labels for e in srv.client().list("Endpoint", name="web")] == [{"app": "shop"}]


def test_what_apply_cannot_change_is_refused_with_why(srv: ServerProc) -> None:
    host = yaml.safe_load(cli(srv, "get", "host", "h1", "-o", "yaml").output)
    host["spec"]["underlay_ip"] = "198.18.0.9"
    r = cli(srv, "apply", "-f", "-", stdin=yaml.safe_dump(host))
    assert r.exit_code == 1 and "registered by its agent" in r.output, r.output
    block = yaml.safe_load(cli(srv, "get", "blocks", "-o", "yaml").output)["items"][0]
    block["spec"]["host"] = None
    r = cli(srv, "apply", "-f", "-", stdin=yaml.safe_dump(block))
    assert r.exit_code == 1 and "IPAM" in r.output, r.output
    host["spec"]["underlay_ip"] = "198.18.0.1"
    host["metadata"]["labels"] = {"rack": "b"}
    r = cli(srv, "apply", "-f", "-", stdin=yaml.safe_dump(host))
    assert r.exit_code == 0 and "host/h1 configured (labels)" in r.output, r.output


def test_status_is_shown_apart_and_never_applied(srv: ServerProc) -> None:
    doc = yaml.safe_load(cli(srv, "get", "endpoints", "-o", "yaml").output)["items"][0]
    assert "state" in doc["status"] and "status" not in doc["spec"]
    assert doc["metadata"]["namespace"] == "shop" and doc["metadata"]["id"]


def test_a_hand_written_network_applied_twice_is_unchanged_and_keeps_its_subnet_ids(srv: ServerProc) -> None:
    doc = ("apiVersion: tether.dev/v1\nkind: Network\nmetadata: {name: green}\n"
           "spec: {subnets: [{cidr: 10.76.0.0/16}], nat_outgoing: true}\n")
    assert "network/green created" in cli(srv, "apply", "-f", "-", stdin=doc).output
    before = srv.client().get("Network", "green").subnets[0].id
    r = cli(srv, "apply", "-f", "-", stdin=doc)
    assert "network/green unchanged" in r.output, r.output
    r = cli(srv, "apply", "-f", "-", stdin=doc.replace("true", "false"))
    assert "network/green configured (nat_outgoing)" in r.output, r.output
    assert srv.client().get("Network", "green").subnets[0].id == before


def test_describe_shows_the_document_and_what_the_system_says(srv: ServerProc) -> None:
    r = cli(srv, "describe", "network", "blue")
    assert r.exit_code == 0 and "kind: Network" in r.output and "shop/web 10.77." in r.output, r.output
    r = cli(srv, "describe", "svc", "web", "-n", "shop")
    assert r.exit_code == 0 and "ready backends" in r.output, r.output
    r = cli(srv, "describe", "svc", "nothere", "-n", "shop")
    assert r.exit_code == 1 and "no Service 'nothere'" in r.output


def test_delete_by_kind_and_name_and_missing_objects_exit_1(srv: ServerProc) -> None:
    sg = "apiVersion: tether.dev/v1\nkind: SecurityGroup\nmetadata: {name: ssh}\nspec: {}\n"
    r = cli(srv, "delete", "-f", "-", stdin=sg)  # a hand-written document finds the group by its name
    assert r.exit_code == 0 and "securitygroup/ssh deleted" in r.output, r.output
    r = cli(srv, "delete", "-f", "-", stdin=sg)
    assert r.exit_code == 1 and "securitygroup/ssh not found" in r.output
    assert cli(srv, "delete", "-f", "-", "--ignore-not-found", stdin=sg).exit_code == 0
    r = cli(srv, "delete", "netpol", "deny", "-n", "shop")
    assert r.exit_code == 0 and "deleted" in r.output, r.output
    assert cli(srv, "delete", "netpol", "deny", "-n", "shop").exit_code == 1
    assert "give -f FILE, or KIND NAME" in cli(srv, "delete").output


def test_flows_without_a_lab_or_socket_does_not_talk_about_probe(monkeypatch) -> None:
    import tether.lab.cluster as cluster

    monkeypatch.setattr(cluster, "all_labs", lambda: [])
    monkeypatch.delenv("TETHER_LAB", raising=False)
    monkeypatch.setenv("TETHER_SERVER", "http://127.0.0.1:9")  # nothing listens there
    r = runner.invoke(app, ["flows", "--denied"])  # flows come from the server's ring
    assert r.exit_code == 1 and "--probe" not in r.output, r.output
    assert "cannot reach the Tether server" in r.output
