"""Malformed input to the Docker driver: broken HTTP on its socket, and garbage JSON and wrong
types to every libnetwork and IPAM method. The driver answers {"Err": ...} ({"Error": ...} for
IPAM) or a 4xx, or closes a connection it cannot parse, and keeps serving; no input reaches an
unexpected exception (an "internal error" answer with a traceback in the log). The dataplane
(veth create/delete) and the server are fakes: nothing here touches a kernel interface."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.fuzz.harness import examples
from tests.fuzz.sockets import exchange
from tether.agent.docker.driver import GATEWAY_TYPE, GENERIC, PORTMAP, DockerPlugin
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica
from tether.client import ApiError
from tether.model import Endpoint, Network, Owner, Subnet

CIDR = "10.77.0.0/16"


class FakeServer:
    """The API calls the driver makes, over dicts, validating as the server's models do."""

    def __init__(self) -> None:
        self.nets = {"blue": Network(name="blue", subnets=[Subnet(cidr=CIDR)])}
        self.endpoints: dict[str, Endpoint] = {}

    async def create_endpoint(self, ep: Endpoint) -> Endpoint:
        ep = ep.model_copy(update={"ips": ep.ips or ["10.77.0.5"]})
        self.endpoints[ep.id] = ep
        return ep

    async def get(self, kind: str, name: str) -> Any:
        table: dict[str, Any] = self.endpoints if kind == "Endpoint" else self.nets
        if name not in table:
            raise ApiError(404, f"{kind} {name!r} not found")
        return table[name]

    async def list(self, kind: str, **filters: Any) -> list[Any]:
        if kind == "Network":
            return list(self.nets.values())
        return [e for e in self.endpoints.values() if all(getattr(e, k) == v for k, v in filters.items())]

    async def release_by_handle(self, handle: str) -> None:
        for k, e in list(self.endpoints.items()):
            if e.handle == handle:
                del self.endpoints[k]

    async def patch_endpoint(self, ep_id: str, changes: dict[str, Any]) -> Endpoint:
        ep = await self.get("Endpoint", ep_id)
        try:
            new = Endpoint.model_validate({**ep.model_dump(), **changes})
        except ValidationError as e:
            raise ApiError(422, str(e)) from None
        self.endpoints[ep_id] = new
        return new

    async def apply(self, obj: Any) -> Any:
        if isinstance(obj, Network):
            self.nets[obj.name] = obj
        return obj

    async def delete(self, kind: str, name: str) -> None:
        raise ApiError(404, f"{kind} {name!r} not found")


@pytest.fixture
def no_dataplane(monkeypatch) -> list[tuple]:
    import tether.dataplane.pods as pods

    calls: list[tuple] = []

    def fake_plug(**kw):
        calls.append(("plug_link", kw))
        return types.SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(pods, "plug_link", fake_plug)
    monkeypatch.setattr(pods, "delete_link", lambda *a, **kw: calls.append(("delete_link", a)) and False)
    return calls


def make_plugin(state_dir: str) -> DockerPlugin:
    with_state = os.path.join(state_dir, "docker.json")
    if os.path.exists(with_state):
        os.unlink(with_state)  # each plugin starts from the same state
    server = FakeServer()
    replica = Replica()
    replica.objects["Network"]["blue"] = server.nets["blue"]
    ep = Endpoint(id="e1", name="c1", network="blue", host="h1", ips=["10.77.0.9"], handle="docker/e1",
                  owner=Owner(type="docker", docker_endpoint_id="dockerep1"), interface="tthe1")
    server.endpoints[ep.id] = ep
    replica.objects["Endpoint"][ep.id] = ep
    plugin = DockerPlugin(LocalEndpoints("h1", replica, 1500), server, state_dir,  # type: ignore[arg-type]
                          os.path.join(state_dir, "tether.sock"), "unix:///nonexistent/docker.sock")
    plugin.networks["dnet"] = {"network": "blue", "cidr": CIDR}
    plugin.endpoints["dockerep1"] = "e1"
    return plugin


async def stop_tasks(plugin: DockerPlugin) -> None:
    for t in list(plugin.tasks):
        t.cancel()
    await asyncio.gather(*plugin.tasks, return_exceptions=True)
    await plugin.docker.close()


def assert_driver_answer(path: str, answer: Any) -> None:
    assert isinstance(answer, dict), answer
    field = "Error" if path.startswith("/IpamDriver.") else "Err"
    if field in answer:
        assert isinstance(answer[field], str) and answer[field], answer
        assert "internal error" not in answer[field], answer


# --- every method, generated bodies (unit level) -------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                 st.lists(st.one_of(st.text(max_size=4), st.integers(0, 9)), max_size=2),
                 st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers()), max_size=2))


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, JUNK)


IDS = st.sampled_from(["dnet", "dockerep1", "unknown", "", "x" * 80])
POOLS = st.sampled_from([CIDR, "tether/" + CIDR, "10.78.0.0/16", "10.77.0.0/24", "bogus", "10.77.0.1/16", ""])
ADDRS = st.sampled_from(["10.77.0.9/16", "10.77.0.20", "10.78.0.1/16", "bogus", "", "10.77.0.9"])
FIELDS: dict[str, st.SearchStrategy] = {
    "NetworkID": maybe(IDS), "EndpointID": maybe(IDS), "SandboxKey": maybe(st.just("/var/run/docker/netns/x")),
    "PoolID": maybe(POOLS), "Pool": maybe(POOLS), "SubPool": maybe(POOLS), "V6": maybe(st.booleans()),
    "Address": maybe(ADDRS), "AddressSpace": maybe(st.just("tether")),
    "Options": maybe(st.fixed_dictionaries({}, optional={
        "RequestAddressType": maybe(st.just(GATEWAY_TYPE)),
        GENERIC: maybe(st.dictionaries(st.sampled_from(["encap", "mtu", "nat-outgoing", "security-groups",
                                                        "network", "dns-domain", "colour"]),
                                       st.one_of(st.sampled_from(["vxlan", "1500", "true", "x"]), JUNK),
                                       max_size=3)),
        PORTMAP: maybe(st.lists(maybe(st.fixed_dictionaries({}, optional={
            "Proto": maybe(st.sampled_from([6, 17, 1])), "Port": maybe(st.integers(0, 70000)),
            "HostPort": maybe(st.integers(0, 70000)), "HostPortEnd": JUNK, "HostIP": JUNK})), max_size=2))})),
    "IPv4Data": maybe(st.lists(maybe(st.fixed_dictionaries({}, optional={
        "Pool": maybe(POOLS), "Gateway": maybe(ADDRS), "AddressSpace": JUNK})), max_size=2)),
    "IPv6Data": JUNK,
    "Interface": maybe(st.fixed_dictionaries({}, optional={
        "Address": maybe(ADDRS), "AddressIPv6": JUNK, "MacAddress": maybe(st.sampled_from(
            ["02:42:ac:11:00:02", "not-a-mac", ""]))})),
}
BODY = st.one_of(st.fixed_dictionaries({}, optional=FIELDS), JUNK)


def test_every_driver_method_answers_err_for_generated_bodies_never_an_internal_error(tmp_path,
                                                                                      no_dataplane) -> None:
    paths = sorted(make_plugin(str(tmp_path)).methods) + ["/NetworkDriver.Unknown"]
    loop = asyncio.new_event_loop()

    @settings(max_examples=examples(600), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), body=BODY)
    def fuzz(path: str, body: Any) -> None:
        plugin = make_plugin(str(tmp_path))
        # what the HTTP layer passes on: a JSON object, anything else as {}
        req = body if isinstance(body, dict) else {}

        async def go() -> Any:
            try:
                return await asyncio.wait_for(plugin.call(path, req), 5)
            finally:
                await stop_tasks(plugin)

        try:
            answer = loop.run_until_complete(go())
        except Exception as e:  # noqa: BLE001 - the finding itself
            raise AssertionError(f"{path} {json.dumps(req)}: {type(e).__name__}: {e} (the HTTP layer answers "
                                 "'internal error' and logs a traceback)") from e
        assert_driver_answer(path, answer)

    try:
        fuzz()
    finally:
        loop.close()


# --- malformed HTTP on the real socket ------------------------------------------------------------

class Served:
    def __init__(self, state_dir: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.plugin = make_plugin(state_dir)
        asyncio.run_coroutine_threadsafe(self.plugin.server.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.plugin.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def served(tmp_path, no_dataplane) -> Iterator[Served]:
    s = Served(str(tmp_path))
    try:
        yield s
    finally:
        s.close()




def responses(raw: bytes) -> list[tuple[int, Any]]:
    """(status, JSON body) of each HTTP response in `raw`."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"a partial HTTP response: {raw[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
        out.append((status, json.loads(rest[:length])))
        raw = rest[length:]
    return out


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + body


HTTP_CASES = {
    "garbage request line": b"HELLO\r\n\r\n",
    "request line without a path": b"POST\r\n\r\n",
    "binary garbage": bytes(range(256)) * 4,
    "Content-Length not a number": b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}",
    "negative Content-Length": b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}",
    "huge Content-Length": b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}",
    "body shorter than declared": b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}",
    "chunk size not hex": b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunked body cut short": b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}",
    "header line without a colon": post("/Plugin.Activate", b"{}", "NoColonHere\r\n"),
    "very long header line": post("/Plugin.Activate", b"{}", "X-Long: " + "a" * 200_000 + "\r\n"),
    "body not JSON": post("/NetworkDriver.CreateNetwork", b"{not json"),
    "body not UTF-8": post("/NetworkDriver.CreateNetwork", b"\xff\xfe\x00\x80"),
    "body a JSON array": post("/NetworkDriver.CreateNetwork", b"[1, 2]"),
    "body a JSON string": post("/NetworkDriver.Join", b'"hello"'),
    "body null": post("/NetworkDriver.CreateEndpoint", b"null"),
    "no body for CreateEndpoint": post("/NetworkDriver.CreateEndpoint", b""),
    "no body for Join": post("/NetworkDriver.Join", b""),
    "no body for CreateNetwork": post("/NetworkDriver.CreateNetwork", b""),
    "no body for ProgramExternalConnectivity": post("/NetworkDriver.ProgramExternalConnectivity", b""),
    "IPAM RequestAddress with a number as PoolID": post("/IpamDriver.RequestAddress", b'{"PoolID": 5}'),
    "IPAM RequestPool with a list as Pool": post("/IpamDriver.RequestPool", b'{"Pool": ["10.0.0.0/8"]}'),
    "CreateNetwork with a string as IPv4Data": post("/NetworkDriver.CreateNetwork",
                                                    b'{"NetworkID": "n2", "IPv4Data": "10.0.0.0/8"}'),
    "unknown method": post("/NetworkDriver.Explode", b"{}"),
}


@pytest.mark.parametrize("name", sorted(HTTP_CASES))
def test_malformed_http_to_the_docker_socket_gets_err_or_4xx_or_a_close_and_it_keeps_serving(served, name) -> None:
    raw = exchange(served.plugin.server.path, HTTP_CASES[name])
    for status, body in responses(raw):
        assert status < 500, (status, body)
        if status == 200:
            assert_driver_answer(HTTP_CASES[name].split(b" ")[1].decode("latin-1"), body)
    again = responses(exchange(served.plugin.server.path, post("/Plugin.Activate", b"{}")))
    assert again == [(200, {"Implements": ["NetworkDriver", "IpamDriver"]})]


def test_ipam_calls_get_their_error_in_the_field_ipam_clients_read(served) -> None:
    """libnetwork's IPAM API reads `Error`, its network API `Err`: a bad body gets the right one."""
    [(status, body)] = responses(exchange(served.plugin.server.path, post("/IpamDriver.RequestPool", b"{bad")))
    assert status == 400 and "Error" in body and "Err" not in body
    [(status, body)] = responses(exchange(served.plugin.server.path, post("/NetworkDriver.CreateNetwork", b"{bad")))
    assert status == 400 and "Err" in body and "Error" not in body
