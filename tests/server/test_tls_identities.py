"""Issue 23: the API over TLS verified against the cluster's own CA, per-host credentials from a
join with a short-lived bootstrap token, a node authorizer (a host writes only its own host,
status and endpoints), revocation that locks a host out at once, and clients with several servers."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.etcd import free_port
from tests.fixtures.server import ServerProc, start_server
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable, TetherClient
from tether.join import JoinError, join
from tether.model import Endpoint, Host, Network, Service, ServiceBackend, ServicePort, Subnet
from tether.trust import ca_hash


@pytest.fixture
def srv(tmp_path) -> Iterator[tuple[ServerProc, str]]:
    """A server with a loopback HTTP listener (.url) and an HTTPS one (returned beside it)."""
    port = free_port()
    s = start_server("sqlite://" + str(tmp_path / "tether.db"), str(tmp_path / "server"),
                     "--listen", f"https://127.0.0.1:{port}")
    try:
        yield s, f"https://127.0.0.1:{port}"
    finally:
        s.stop()


def ca_of(s: ServerProc) -> str:
    return os.path.join(s.state_dir, "ca.crt")


def admin(s: ServerProc) -> TetherClient:
    return TetherClient(s.url, s.token)


def joined(s: ServerProc, https: str, host: str, tmp_path) -> TetherClient:
    """A client holding `host`'s credential, joined with a bootstrap token and the CA pin."""
    out = admin(s).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 600})
    state = str(tmp_path / f"agent-{host}")
    path, ca = join([https], out["token"], host, state, ca_pin=out["ca_hash"])
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with open(path) as f:
        credential = f.read().strip()
    c = TetherClient(https, credential, ca_file=ca)
    c.request("PUT", "/api/v1/hosts/" + host, content=Host(name=host, underlay_ip="198.18.0.1" if host == "h1"
                                                             else "198.18.0.2", underlay_cidr="198.18.0.0/24")
              .model_dump_json(exclude={"revision"}))
    return c


def test_https_listener_answers_a_client_that_trusts_the_server_ca(srv) -> None:
    s, https = srv
    c = TetherClient(https, s.token, ca_file=ca_of(s))
    assert c.list("Network") == []
    assert httpx.get(https + "/healthz", verify=False).status_code == 200  # it really is TLS on that port
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(https.replace("https://", "http://") + "/healthz", timeout=5)


def test_a_client_with_another_ca_refuses_the_server(srv, tmp_path) -> None:
    from tether.server.tls import ensure_tls

    s, https = srv
    other = ensure_tls(str(tmp_path / "other"), [], [])
    with pytest.raises(ServerUnreachable, match="not the one you trust"):
        TetherClient(https, s.token, ca_file=other.ca).list("Network")
    with pytest.raises(ServerUnreachable, match="not the one you trust"):  # nor the system store
        TetherClient(https, s.token).list("Network")


def test_the_server_certificate_covers_the_added_names_and_its_ca_pin_is_printed(srv, tmp_path) -> None:
    from cryptography import x509

    s, _ = srv
    with open(os.path.join(s.state_dir, "server.crt"), "rb") as f:
        san = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert oct(os.stat(os.path.join(s.state_dir, "ca.key")).st_mode & 0o777) == "0o600"
    out = admin(s).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 60})
    with open(ca_of(s), "rb") as f:
        assert out["ca_hash"] == ca_hash(f.read())


def test_plain_http_off_loopback_needs_the_explicit_dangerous_flag() -> None:
    from tether.server.main import wants_tls

    class Sock:
        family = socket.AF_INET

        def __init__(self, ip: str) -> None:
            self.ip = ip

        def getsockname(self) -> tuple[str, int]:
            return (self.ip, 7443)

    assert wants_tls("192.0.2.1:7443", Sock("192.0.2.1"), False) is True
    assert wants_tls("127.0.0.1:7443", Sock("127.0.0.1"), False) is False
    assert wants_tls("https://127.0.0.1:7443", Sock("127.0.0.1"), False) is True
    with pytest.raises(SystemExit, match="in clear"):
        wants_tls("http://192.0.2.1:7443", Sock("192.0.2.1"), False)
    assert wants_tls("http://192.0.2.1:7443", Sock("192.0.2.1"), True) is False


def test_join_refuses_a_server_whose_ca_does_not_match_the_pin(srv, tmp_path) -> None:
    s, https = srv
    out = admin(s).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 600})
    with pytest.raises(JoinError, match="not the pinned"):
        join([https], out["token"], "h1", str(tmp_path / "a"), ca_pin="sha256:" + "0" * 64)
    assert not os.path.exists(tmp_path / "a" / "credential")


def test_host_credential_writes_its_own_objects_and_nothing_else(srv, tmp_path) -> None:
    s, https = srv
    a = admin(s)
    a.create_network(Network(name="blue", subnets=[Subnet(cidr="10.80.0.0/16")]))
    h1, h2 = joined(s, https, "h1", tmp_path), joined(s, https, "h2", tmp_path)
    mine = h1.create_endpoint(Endpoint(name="p1", network="blue", host="h1"))
    assert mine.ips  # IPAM allocation for its own endpoint
    h1.request("POST", "/api/v1/hosts/h1/heartbeat", json={"ttl": 15})
    h1.request("PUT", "/api/v1/hosts/h1/status", json={"problems": []})
    assert h1.snapshot()["objects"]
    theirs = h2.create_endpoint(Endpoint(name="p2", network="blue", host="h2"))
    forbidden = [
        lambda: h1.create_endpoint(Endpoint(name="x", network="blue", host="h2")),
        lambda: h1.delete("Endpoint", theirs.id),
        lambda: h1.request("PATCH", f"/api/v1/endpoints/{theirs.id}", json={"labels": {"a": "b"}}),
        lambda: h1.request("PATCH", f"/api/v1/endpoints/{mine.id}", json={"host": "h2"}),
        lambda: h1.request("DELETE", f"/api/v1/endpoints/by-handle/{theirs.handle or theirs.id}"),
        lambda: h1.create_network(Network(name="red", subnets=[Subnet(cidr="10.81.0.0/16")])),
        lambda: h1.apply(Network(name="blue", subnets=[Subnet(cidr="10.80.0.0/16")], nat_outgoing=True)),
        lambda: h1.delete("Network", "blue"),
        lambda: h1.request("PUT", "/api/v1/hosts/h2/status", json={"problems": []}),
        lambda: h1.request("DELETE", "/api/v1/hosts/h2"),
        lambda: h1.request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 60}),
        lambda: h1.request("DELETE", "/api/v1/hosts/h2/credential"),
        lambda: h1.request("GET", "/v2.0/networks"),
    ]
    for call in forbidden:
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 403, e.value.detail
        assert "h1" in e.value.detail
    assert {n.name for n in a.list("Network")} == {"blue"}
    assert a.get("Endpoint", theirs.id).labels == {}
    h1.delete("Endpoint", mine.id)


def test_a_host_creates_and_deletes_only_networks_labelled_as_dockers(srv, tmp_path) -> None:
    """`docker network create/rm` on any Docker host, with its host credential: a new network labelled
    tether.io/created-by=docker, and deleting such a network; nothing else about networks."""
    s, https = srv
    a = admin(s)
    a.create_network(Network(name="blue", subnets=[Subnet(cidr="10.80.0.0/16")]))
    h1 = joined(s, https, "h1", tmp_path)
    docker = {"tether.io/created-by": "docker"}
    made = h1.apply(Network(name="dk", subnets=[Subnet(cidr="10.82.0.0/16")], labels=docker))
    assert made.labels == docker
    forbidden = [
        lambda: h1.apply(Network(name="red", subnets=[Subnet(cidr="10.81.0.0/16")])),  # not Docker's
        lambda: h1.apply(Network(name="ext", subnets=[Subnet(cidr="10.83.0.0/16")], labels=docker, external=True)),
        lambda: h1.apply(Network(name="blue", subnets=[Subnet(cidr="10.80.0.0/16")], labels=docker)),  # exists
        lambda: h1.apply(Network(name="dk", subnets=[Subnet(cidr="10.82.0.0/16")], labels=docker, mtu=1400)),
        lambda: h1.delete("Network", "blue"),  # the admin's
    ]
    for call in forbidden:
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 403 and "h1" in e.value.detail, e.value.detail
    assert {n.name for n in a.list("Network")} == {"blue", "dk"} and a.get("Network", "dk").mtu is None
    h1.delete("Network", "dk")
    assert {n.name for n in a.list("Network")} == {"blue"}


def test_a_host_publishes_only_its_own_endpoints_on_itself(srv, tmp_path) -> None:
    """Docker's -p and CNI hostPort with the host credential: a NodePort service with host = itself
    and its own endpoints as backends; nothing that steers other hosts' traffic."""
    s, https = srv
    a = admin(s)
    a.create_network(Network(name="blue", subnets=[Subnet(cidr="10.80.0.0/16")]))
    h1, h2 = joined(s, https, "h1", tmp_path), joined(s, https, "h2", tmp_path)
    mine = h1.create_endpoint(Endpoint(name="p1", network="blue", host="h1"))
    theirs = h2.create_endpoint(Endpoint(name="p2", network="blue", host="h2"))

    def svc(name: str, ep: Endpoint, **kw) -> Service:
        fields = {"type": "NodePort", "host": "h1", "backends": [ServiceBackend(ip=ep.ips[0], endpoint=ep.id)],
                  "ports": [ServicePort(port=80, node_port=31900)], **kw}
        return Service(name=name, **fields)

    h1.apply(svc("pub1", mine))
    for bad in (svc("x1", theirs), svc("x2", mine, host="h2"), svc("x3", mine, host=None),
                svc("x4", mine, type="ClusterIP", host=None, ports=[ServicePort(port=80)])):
        with pytest.raises(ApiError) as e:
            h1.apply(bad)
        assert e.value.status == 403 and "h1" in e.value.detail, e.value.detail
    a.apply(Service(name="adm", selector={"a": "b"}, ports=[ServicePort(port=80)]))
    with pytest.raises(ApiError) as e:
        h1.delete("Service", "default/adm")
    assert e.value.status == 403
    h1.delete("Service", "default/pub1")
    assert {x.name for x in a.list("Service")} == {"adm"}


def test_a_revoked_host_gets_401_on_its_next_call_and_its_watch_ends(srv, tmp_path) -> None:
    s, https = srv
    h1 = joined(s, https, "h1", tmp_path)
    rev = h1.snapshot()["revision"]
    with open(tmp_path / "agent-h1" / "credential") as f:
        credential = f.read().strip()

    async def watch_until_cut() -> float:
        c = AsyncTetherClient(https, credential, ca_file=str(tmp_path / "agent-h1" / "ca.crt"))
        started = time.monotonic()
        try:
            async for _ in c.watch(rev):
                pass
        finally:
            await c.close()
        return time.monotonic() - started

    async def scenario() -> float:
        task = asyncio.create_task(watch_until_cut())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(admin(s).request, "DELETE", "/api/v1/hosts/h1/credential")
        return await asyncio.wait_for(task, 3)

    assert asyncio.run(scenario()) < 3
    with pytest.raises(ApiError) as e:
        h1.request("POST", "/api/v1/hosts/h1/heartbeat", json={"ttl": 15})
    assert e.value.status == 401 and "revoked" in e.value.detail
    assert "credential" not in str(admin(s).snapshot())  # kept outside the objects, hashed


def test_deleting_a_host_revokes_its_credential(srv, tmp_path) -> None:
    s, https = srv
    h1 = joined(s, https, "h1", tmp_path)
    admin(s).delete("Host", "h1")
    with pytest.raises(ApiError) as e:
        h1.list("Network")
    assert e.value.status == 401


def test_an_expired_bootstrap_token_is_refused(srv, tmp_path) -> None:
    s, https = srv
    out = admin(s).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 1})
    time.sleep(1.3)
    with pytest.raises(ApiError) as e:
        join([https], out["token"], "h1", str(tmp_path / "a"), ca_pin=out["ca_hash"])
    assert e.value.status == 401 and "expired" in e.value.detail


def test_a_bootstrap_token_only_joins_and_cannot_take_over_a_joined_host(srv, tmp_path) -> None:
    s, https = srv
    joined(s, https, "h1", tmp_path)
    out = admin(s).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 600})
    with pytest.raises(ApiError) as e:
        TetherClient(https, out["token"], ca_file=ca_of(s)).list("Network")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        join([https], out["token"], "h1", str(tmp_path / "thief"), ca_file=ca_of(s))
    assert e.value.status == 409 and "revoke" in e.value.detail


def test_credentials_are_stored_hashed(srv, tmp_path) -> None:
    import sqlite3

    s, https = srv
    joined(s, https, "h1", tmp_path)
    with open(tmp_path / "agent-h1" / "credential") as f:
        secret = f.read().strip().rsplit(".", 1)[1]
    db = sqlite3.connect(str(tmp_path / "tether.db"))
    dump = "\n".join(str(row) for row in db.iterdump())
    assert "/tether/auth/hosts/h1" in dump and secret not in dump


def test_a_comma_list_of_servers_is_used_in_order_past_one_that_is_down(srv) -> None:
    s, _ = srv
    dead = f"http://127.0.0.1:{free_port()}"
    c = TetherClient(f"{dead},{s.url}", s.token)
    assert c.list("Network") == []
    assert c.servers[c.current] == s.url


@pytest.fixture
def two_servers(etcd_server, tmp_path) -> Iterator[list[ServerProc]]:
    """Two servers over one etcd, sharing the admin token (copied, as an operator would)."""
    etcd_server.wipe()
    a = start_server(etcd_server.url, str(tmp_path / "a"), "--gc-interval", "0")
    os.makedirs(tmp_path / "b", mode=0o700)
    with open(tmp_path / "b" / "token", "w") as f:
        f.write(a.token)
    b = start_server(etcd_server.url, str(tmp_path / "b"), "--gc-interval", "0")
    try:
        yield [a, b]
    finally:
        a.stop()
        b.stop()
        etcd_server.wipe()


def test_a_watch_moves_to_the_next_server_when_its_server_stops_without_losing_an_event(two_servers) -> None:
    a, b = two_servers
    writer = TetherClient(b.url, b.token)
    writer.create_network(Network(name="blue", subnets=[Subnet(cidr="10.82.0.0/16")]))
    start = writer.snapshot()["revision"]
    names = [f"p{i}" for i in range(40)]

    async def scenario() -> list[str]:
        watcher = AsyncTetherClient(f"{a.url},{b.url}", a.token)
        seen: list[str] = []
        events: list[tuple[int, str]] = []

        async def follow() -> None:
            async for ev in watcher.watch(start):
                if ev["type"] == "put" and ev["kind"] == "Endpoint":
                    seen.append(ev["object"]["name"])
                if ev["type"] == "put":
                    events.append((ev["revision"], ev["key"]))
                if len(seen) == len(names):
                    return

        task = asyncio.create_task(follow())
        for i, name in enumerate(names):
            if i == 20:
                await asyncio.to_thread(a.kill)  # SIGKILL: the stream breaks, no goodbye
            await asyncio.to_thread(writer.create_endpoint, Endpoint(name=name, network="blue", host="h1"))
        await asyncio.wait_for(task, 20)
        assert len(set(events)) == len(events)  # no event twice
        assert [r for r, _ in events] == sorted(r for r, _ in events)  # in order
        assert watcher.servers[watcher.current] == b.url
        await watcher.close()
        return seen

    TetherClient(b.url, b.token).request("PUT", "/api/v1/hosts/h1", json={
        "name": "h1", "underlay_ip": "198.18.0.1", "underlay_cidr": "198.18.0.0/24"})
    assert asyncio.run(scenario()) == names


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/api/v1/snapshot", True), ("GET", "/api/v1/watch", True), ("GET", "/api/v1/networks/blue", True),
    ("PUT", "/api/v1/hosts/h1", True), ("PUT", "/api/v1/hosts/h1/status", True),
    ("POST", "/api/v1/hosts/h1/heartbeat", True), ("POST", "/api/v1/endpoints", True),
    ("PATCH", "/api/v1/endpoints/e1", True), ("DELETE", "/api/v1/endpoints/by-handle/c1", True),
    ("PUT", "/api/v1/namespaces/shop", True),
    ("PUT", "/api/v1/hosts/h2", False), ("POST", "/api/v1/hosts/h2/heartbeat", False),
    ("DELETE", "/api/v1/hosts/h1", False), ("POST", "/api/v1/hosts/h1", False),
    ("POST", "/api/v1/networks", False), ("PUT", "/api/v1/networks/blue", True),  # the route checks the label
    ("DELETE", "/api/v1/networks/blue", True), ("PUT", "/api/v1/networks/blue/x", False),
    ("DELETE", "/api/v1/namespaces/shop", False),
    ("PUT", "/api/v1/namespaces/shop/networkpolicies/p", False), ("PUT", "/api/v1/namespaces/shop/services/s", True),
    ("POST", "/api/v1/securitygroups", False),
    ("POST", "/api/v1/bootstrap-tokens", False), ("DELETE", "/api/v1/hosts/h2/credential", False),
    ("GET", "/v2.0/networks", False), ("POST", "/v2.0/ports", False), ("GET", "/openapi.json", False),
])
def test_the_node_authorizer_lets_a_host_make_only_its_agents_calls(method: str, path: str, allowed: bool) -> None:
    from tether.server.auth import host_rule

    why = host_rule("h1", method, path)
    assert (why is None) == allowed, why


def test_operator_supplied_certificate_files_are_served(tmp_path) -> None:
    from tether.server.tls import ensure_tls

    own = ensure_tls(str(tmp_path / "pki"), [], ["tether.example"])  # stands in for the operator's PKI
    port = free_port()
    s = start_server("sqlite://" + str(tmp_path / "tether.db"), str(tmp_path / "server"),
                     "--listen", f"https://127.0.0.1:{port}", "--tls-cert", own.cert, "--tls-key", own.key,
                     "--tls-ca", own.ca)
    try:
        assert TetherClient(f"https://127.0.0.1:{port}", s.token, ca_file=own.ca).list("Network") == []
        assert not os.path.exists(os.path.join(s.state_dir, "ca.key"))  # no CA of its own was made
        with open(own.ca, "rb") as f:
            assert httpx.get(f"https://127.0.0.1:{port}/ca.crt", verify=False).content == f.read()
    finally:
        s.stop()


def test_the_cli_makes_a_token_joins_a_host_and_revokes_it(srv, tmp_path) -> None:
    import json
    import subprocess
    import sys

    s, https = srv
    cli = [sys.executable, "-m", "tether.cli.main"]
    env = {**os.environ, "TETHER_SERVER": s.url, "TETHER_TOKEN": s.token}
    made = subprocess.run([*cli, "host", "token", "create", "--ttl", "5m", "-o", "json"], env=env,
                          capture_output=True, text=True, check=True)
    out = json.loads(made.stdout)
    assert out["expires"] - time.time() == pytest.approx(300, abs=30)
    state = str(tmp_path / "agent")
    joined_ = subprocess.run([*cli, "host", "join", "--server", https, "--token", out["token"], "--ca-hash",
                              out["ca_hash"], "--host", "n1", "--state-dir", state], capture_output=True, text=True)
    assert joined_.returncode == 0, joined_.stderr
    with open(os.path.join(state, "credential")) as f:
        credential = f.read().strip()
    as_host = {**os.environ, "TETHER_SERVER": https, "TETHER_TOKEN": credential,
               "TETHER_CA_FILE": os.path.join(state, "ca.crt")}
    denied = subprocess.run([*cli, "network", "create", "x", "--subnet", "10.83.0.0/16"], env=as_host,
                            capture_output=True, text=True)
    assert denied.returncode == 1 and "HTTP 403" in " ".join(denied.stderr.split())
    assert subprocess.run([*cli, "host", "revoke", "n1"], env=env, capture_output=True).returncode == 0
    locked = subprocess.run([*cli, "network", "list"], env=as_host, capture_output=True, text=True)
    assert locked.returncode == 1 and "HTTP 401" in " ".join(locked.stderr.split())


def test_a_watch_through_another_server_ends_when_the_host_is_revoked(two_servers, tmp_path) -> None:
    a, b = two_servers
    out = TetherClient(a.url, a.token).request("POST", "/api/v1/bootstrap-tokens", json={"ttl": 60})
    credential = TetherClient(a.url, out["token"]).request("POST", "/api/v1/join", json={"host": "h1"})["credential"]
    rev = TetherClient(a.url, a.token).snapshot()["revision"]

    async def scenario() -> float:
        c = AsyncTetherClient(a.url, credential)

        async def follow() -> None:
            async for _ in c.watch(rev):
                pass

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await asyncio.to_thread(TetherClient(b.url, b.token).request, "DELETE", "/api/v1/hosts/h1/credential")
        await asyncio.wait_for(task, 15)
        await c.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 12  # the next credential check (5 s) or bookmark, not never


def test_the_server_certificate_is_reissued_for_a_new_name_from_the_same_ca(tmp_path) -> None:
    from cryptography import x509

    from tether.server.tls import ensure_tls

    first = ensure_tls(str(tmp_path), [], [])
    with open(first.ca, "rb") as f:
        ca_before = f.read()
    again = ensure_tls(str(tmp_path), ["10.9.8.7:7443"], ["api.example"])
    with open(again.cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.example" in san.get_values_for_type(x509.DNSName)
    assert "10.9.8.7" in {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    with open(again.ca, "rb") as f:
        assert f.read() == ca_before  # hosts keep trusting the same CA
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    os.unlink(tmp_path / "ca.key")  # CA key taken offline: a certificate that still fits is kept
    assert ensure_tls(str(tmp_path), ["10.9.8.7:7443"], ["api.example"]).cert == again.cert
    with pytest.raises(SystemExit, match="ca.key is missing"):
        ensure_tls(str(tmp_path), [], ["other.example"])
