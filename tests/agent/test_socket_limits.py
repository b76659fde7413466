"""The agent's sockets (CNI, Docker plugin, flows) bound what a local client can make them hold:
frame and body caps checked before allocating, read deadlines, idle timeouts, explicit modes, and an
idle CNI client that cannot make applies wait."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import pytest

from tether import jsonline, yielding
from tether.agent import flowlog
from tether.agent.cni import server as cni_server
from tether.agent.cni.server import CniServer
from tether.agent.docker import plugin_http
from tether.agent.docker.plugin_http import PluginHttpServer
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0)  # whatever the umask, the sockets get their own mode
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
async def cni(tmp_path, loose_umask):
    server = CniServer(LocalEndpoints("h1", Replica(), 1500), None, str(tmp_path / "cni.sock"))  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict]:
    code = int.from_bytes(await reader.readexactly(4), "big")
    return code, json.loads(await reader.read())


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False


# --- CNI ------------------------------------------------------------------------------------------------

async def test_cni_socket_is_root_only(cni) -> None:
    assert mode(cni.path) == 0o600


async def test_cni_request_is_answered(cni) -> None:
    reader, writer = await asyncio.open_unix_connection(cni.path)
    writer.write(frame(b"CNI_COMMAND=STATUS") + frame(b'{"cniVersion":"1.1.0","name":"n","type":"tether"}'))
    assert int.from_bytes(await reader.readexactly(4), "big") == 0  # STATUS: ready, no output
    writer.close()


async def test_cni_frame_declaring_a_gigabyte_is_refused_before_any_buffering(cni) -> None:
    reader, writer = await asyncio.open_unix_connection(cni.path)
    writer.write(frame(b"CNI_COMMAND=ADD") + (1 << 30).to_bytes(4, "big") + b"{" * 65536)
    t0 = time.monotonic()
    code, answer = await asyncio.wait_for(read_answer(reader), 5)
    assert time.monotonic() - t0 < 2
    assert code == 1 and "more than the limit" in answer["msg"]
    writer.close()


async def test_cni_environment_frame_over_64k_is_refused(cni) -> None:
    reader, writer = await asyncio.open_unix_connection(cni.path)
    writer.write((100 << 10).to_bytes(4, "big"))
    code, answer = await asyncio.wait_for(read_answer(reader), 5)
    assert code == 1 and "environment frame" in answer["msg"]
    writer.close()


async def test_idle_cni_client_is_closed_after_the_read_deadline(cni, monkeypatch) -> None:
    monkeypatch.setattr(cni_server, "READ_DEADLINE", 0.5)
    _, idle = await asyncio.open_unix_connection(cni.path)
    reader, half = await asyncio.open_unix_connection(cni.path)
    half.write(frame(b"CNI_COMMAND=ADD") + (100).to_bytes(4, "big") + b"{")  # then nothing
    assert await closed_within(reader, 3)
    idle.close()
    half.close()


async def test_idle_cni_clients_do_not_make_applies_wait(cni) -> None:
    clients = [await asyncio.open_unix_connection(cni.path) for _ in range(20)]
    await asyncio.sleep(0.2)
    assert not yielding.busy(), "a client that sent nothing holds the 'CNI request in progress' state"
    for _, w in clients:
        w.close()


# --- Docker plugin ----------------------------------------------------------------------------------------

@pytest.fixture
async def plugin(tmp_path, loose_umask):
    async def handler(path: str, data: dict) -> dict:
        return {"path": path, "got": data}

    server = PluginHttpServer(str(tmp_path / "tether.sock"), handler)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def http_call(path: str, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_docker_plugin_socket_mode_is_explicit(plugin) -> None:
    assert mode(plugin.path) == 0o660


async def test_docker_plugin_answers_a_call(plugin) -> None:
    out = await http_call(plugin.path, b'POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 2\r\n'
                                       b'Connection: close\r\n\r\n{}')
    assert out.startswith(b"HTTP/1.1 200") and b"/Plugin.Activate" in out


async def test_docker_plugin_body_over_the_cap_is_refused_with_413(plugin) -> None:
    out = await http_call(plugin.path, b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nContent-Length: "
                                       + str(64 << 20).encode() + b"\r\n\r\n{")
    assert out.startswith(b"HTTP/1.1 413")


async def test_docker_plugin_chunk_declaring_a_gigabyte_is_refused_before_reading_it(plugin) -> None:
    out = await http_call(plugin.path, b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nTransfer-Encoding: chunked"
                                       b"\r\n\r\n40000000\r\n{{{{")
    assert out.startswith(b"HTTP/1.1 413")


async def test_docker_plugin_closes_idle_and_slow_connections(plugin, monkeypatch) -> None:
    monkeypatch.setattr(plugin_http, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(plugin_http, "REQUEST_DEADLINE", 0.5)
    idle_r, idle_w = await asyncio.open_unix_connection(plugin.path)
    slow_r, slow_w = await asyncio.open_unix_connection(plugin.path)
    slow_w.write(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Le")  # and never the rest
    assert await closed_within(idle_r, 3)
    answer = await asyncio.wait_for(slow_r.read(), 3)
    assert answer.startswith(b"HTTP/1.1 408")
    idle_w.close()
    slow_w.close()


# --- flows.sock -------------------------------------------------------------------------------------------

async def test_flows_socket_mode_is_explicit_not_the_umask(tmp_path, loose_umask, monkeypatch) -> None:
    def no_nflog(*_a):
        raise OSError("not in this test")

    monkeypatch.setattr(flowlog, "open_nflog", no_nflog)
    flows = flowlog.FlowLog("h1", str(tmp_path / "flows.sock"))
    await flows.start()
    try:
        assert mode(flows.path) == 0o660
        assert await asyncio.to_thread(jsonline.query_flows, flows.path) == []
    finally:
        await flows.close()
