"""`tether network update` changes what can change in place and refuses what cannot, saying why
(against a real server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from tests.fixtures.server import ServerProc, start_server
from tether.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("netupd-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"))
    try:
        http = s.http()
        assert http.put("/api/v1/hosts/h1", json={"name": "h1", "underlay_ip": "198.18.0.1"}).status_code < 300
        assert http.post("/api/v1/networks", json={"name": "red", "subnets": [{"cidr": "10.78.0.0/16"}]}).is_success
        assert http.post("/api/v1/endpoints", json={"name": "a", "network": "red", "host": "h1"}).is_success
        yield s
    finally:
        s.stop()


def cli(srv: ServerProc, *args: str):
    return runner.invoke(app, [*args, "--server", srv.url, "--token", srv.token])


def test_update_changes_nat_mtu_labels_and_adds_a_subnet(srv: ServerProc) -> None:
    r = cli(srv, "network", "update", "red", "--nat-outgoing", "--mtu", "1400", "--label", "team=x",
            "--add-subnet", "10.79.0.0/24")
    assert r.exit_code == 0 and "network red updated" in r.output, r.output
    net = srv.client().get("Network", "red")
    assert net.nat_outgoing and net.mtu == 1400 and net.labels == {"team": "x"}
    assert [s.cidr for s in net.subnets] == ["10.78.0.0/16", "10.79.0.0/24"]
    r = cli(srv, "network", "update", "red", "--no-nat-outgoing", "--mtu", "0", "--label", "team=",
            "--remove-subnet", "10.79.0.0/24")
    assert r.exit_code == 0, r.output
    net = srv.client().get("Network", "red")
    assert not net.nat_outgoing and net.mtu is None and net.labels == {} and len(net.subnets) == 1


def test_update_refuses_what_cannot_change_with_the_reason(srv: ServerProc) -> None:
    r = cli(srv, "network", "update", "red", "--remove-subnet", "10.78.0.0/16", "--add-subnet", "10.80.0.0/16")
    assert r.exit_code == 1 and "cannot change until they are deleted" in r.output, r.output
    r = cli(srv, "network", "update", "red", "--block-size", "28")
    assert r.exit_code == 1 and "block size cannot change" in r.output, r.output
    r = cli(srv, "network", "update", "red", "--remove-subnet", "10.99.0.0/16")
    assert r.exit_code == 1 and "has no subnet 10.99.0.0/16" in r.output, r.output
    r = cli(srv, "network", "update", "red")
    assert r.exit_code == 1 and "nothing to change" in r.output
    r = cli(srv, "network", "update", "nosuch", "--nat-outgoing")
    assert r.exit_code == 1 and "HTTP 404" in r.output
    assert srv.client().get("Network", "red").block_size == 26


def test_the_create_conflict_message_names_the_update_command(srv: ServerProc) -> None:
    r = cli(srv, "network", "create", "red", "--subnet", "10.81.0.0/16")
    assert r.exit_code == 1 and "tether network update" in r.output
