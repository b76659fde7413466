"""Malformed input to the CNI path: the agent's CNI socket (frames, env, stdin) and the tether-cni
executable. Whatever arrives, the agent answers a CNI error object (u32 exit code + JSON with
`code` and `msg`) or closes the connection, keeps serving, and leaves no request marked "in
progress"; no input reaches an unexpected exception ("internal error"). tether-cni answers a CNI
result or error object on stdout, never a traceback. The dataplane is replaced by fakes: nothing
here touches a kernel interface."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tether.cni as cni_exe
from tests.fuzz.harness import examples
from tests.fuzz.sockets import exchange
from tether import yielding
from tether.agent.cni import protocol as cp
from tether.agent.cni.server import CniServer
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica
from tether.client import ServerUnreachable

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAME=web"}
CONF = {"cniVersion": "1.0.0", "name": "blue", "type": "tether"}


class FakeClient:
    """The server, unreachable: an ADD that gets that far must answer "try again later"."""

    async def create_endpoint(self, ep: Any) -> Any:
        raise ServerUnreachable("fake server is down")

    async def release_by_handle(self, handle: str) -> None:
        raise ServerUnreachable("fake server is down")

    async def apply(self, obj: Any) -> Any:
        raise ServerUnreachable("fake server is down")

    async def get(self, kind: str, name: str) -> Any:
        raise ServerUnreachable("fake server is down")


def fake_cni_server(path: str) -> CniServer:
    """A CNI server of an agent that has never synced, with a server that is down."""
    return CniServer(LocalEndpoints("h1", Replica(), 1500), FakeClient(), path,  # type: ignore[arg-type]
                     not_ready=lambda: "never synced")


@pytest.fixture
def no_dataplane(monkeypatch) -> list[str]:
    """Every netlink call of the CNI server recorded and none made: plugging fails as it does when
    the kernel refuses, unplugging finds nothing to remove (DEL is idempotent)."""
    calls: list[str] = []
    import tether.dataplane.pods as pods

    def refuse(name: str):
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise OSError(f"fake {name}: no dataplane in this test")
        return fn

    for name in ("plug_link", "address_pod"):
        monkeypatch.setattr(pods, name, refuse(name))
    monkeypatch.setattr(pods, "detach_pod", lambda host_ifname, ipr=None: calls.append("detach_pod") and False)
    monkeypatch.setattr(pods, "check_pod", lambda **kw: ["fake check: no dataplane"])
    return calls


class Loop:
    """A CNI server on a unix socket, on an event loop in its own thread."""

    def __init__(self, path: str) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = fake_cni_server(path)
        self.run(self.server.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def cni(tmp_path, no_dataplane) -> Iterator[Loop]:
    srv = Loop(str(tmp_path / "cni.sock"))
    try:
        yield srv
    finally:
        srv.close()


def frame(env: dict[str, str], stdin: bytes) -> bytes:
    raw = b"".join(f"{k}={v}\0".encode() for k, v in env.items())
    return len(raw).to_bytes(4, "big") + raw + len(stdin).to_bytes(4, "big") + stdin




def assert_cni_error_or_close(answer: bytes) -> None:
    if not answer:
        return  # closed without an answer: allowed for frames that are not a request
    assert len(answer) >= 4, f"answer shorter than its exit code: {answer!r}"
    code = int.from_bytes(answer[:4], "big")
    body = json.loads(answer[4:])
    assert code != 0, f"malformed input answered as a success: {answer!r}"
    assert isinstance(body.get("code"), int) and isinstance(body.get("msg"), str), body
    assert "internal error" not in body["msg"], f"an unexpected exception reached the answer: {body}"


def assert_still_serving(cni: Loop) -> None:
    answer = exchange(cni.server.path, frame({"CNI_COMMAND": "VERSION"}, json.dumps(CONF).encode()))
    assert int.from_bytes(answer[:4], "big") == 0 and json.loads(answer[4:])["supportedVersions"]
    assert not yielding.busy(), "a finished CNI connection left 'request in progress' set: applies would wait"


GOOD = frame(ENV, json.dumps(CONF).encode())
FRAMES = {
    "nothing": b"",
    "two bytes of a length": b"\x00\x01",
    "length without header": (50).to_bytes(4, "big"),
    "header cut short": (50).to_bytes(4, "big") + b"CNI_COMMAND=ADD\0",
    "no stdin length": GOOD[: len(GOOD) - len(json.dumps(CONF)) - 4],
    "stdin cut short": GOOD[:-5],
    "huge declared header": (0xFFFFFFFF).to_bytes(4, "big") + b"CNI_COMMAND=ADD\0" * 10,
    "huge declared stdin": frame(ENV, b"")[:-4] + (0x7FFFFFFF).to_bytes(4, "big") + b"{}",
    "header not UTF-8": (8).to_bytes(4, "big") + b"\xff\xfe=\x80\x00ab" + (2).to_bytes(4, "big") + b"{}",
    "header without KEY=VALUE": (12).to_bytes(4, "big") + b"garbage\0\0\0\0\0" + (2).to_bytes(4, "big") + b"{}",
    "stdin not UTF-8": frame(ENV, b"\xff\xfe\x00garbage"),
    "stdin garbage JSON": frame(ENV, b'{"cniVersion": "1.0.0", "name": '),
    "stdin a JSON list": frame(ENV, b"[1, 2, 3]"),
    "stdin JSON null": frame(ENV, b"null"),
    "cniVersion a number": frame(ENV, json.dumps({**CONF, "cniVersion": 1}).encode()),
    "unknown cniVersion": frame(ENV, json.dumps({**CONF, "cniVersion": "9.9.9"}).encode()),
    "name a list": frame(ENV, json.dumps({**CONF, "name": ["blue"]}).encode()),
    "no CNI_COMMAND": frame({k: v for k, v in ENV.items() if k != "CNI_COMMAND"}, json.dumps(CONF).encode()),
    "unknown CNI_COMMAND": frame({**ENV, "CNI_COMMAND": "EXPLODE"}, json.dumps(CONF).encode()),
    "no CNI_CONTAINERID": frame({k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"}, json.dumps(CONF).encode()),
    "no CNI_NETNS on ADD": frame(ENV, json.dumps(CONF).encode()),
    "netns that does not exist": frame({**ENV, "CNI_NETNS": "/nonexistent/netns"}, json.dumps(CONF).encode()),
    "ifname too long": frame({**ENV, "CNI_IFNAME": "x" * 40}, json.dumps(CONF).encode()),
    "CNI_ARGS without =": frame({**ENV, "CNI_ARGS": "garbage"}, json.dumps(CONF).encode()),
    "trailing bytes after the frame": GOOD + b"more bytes that nobody asked for",
}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_a_malformed_cni_frame_gets_an_error_object_or_a_close_and_the_agent_keeps_serving(cni, name) -> None:
    assert_still_serving(cni)  # warm: the first request opens what every later one reuses
    fds = open_fds()
    for _ in range(3):
        assert_cni_error_or_close(exchange(cni.server.path, FRAMES[name]))
    assert_still_serving(cni)
    deadline = time.monotonic() + 2
    while open_fds() > fds and time.monotonic() < deadline:  # the agent closes its side asynchronously
        time.sleep(0.02)
    assert open_fds() <= fds, "the agent kept a descriptor of a finished connection"


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 99999), st.text(max_size=10),
                 st.lists(st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=4),
                                                                                        st.text(max_size=4))),
                          max_size=3),
                 st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers(), st.none(),
                                                                st.lists(st.text(max_size=3), max_size=2)),
                                 max_size=3))
CONFIG = st.fixed_dictionaries(
    {"cniVersion": st.one_of(st.sampled_from(cp.SUPPORTED), JUNK), "name": st.one_of(st.just("blue"), JUNK),
     "type": st.just("tether")},
    optional={k: JUNK for k in ("network", "labels", "security_groups", "namespace", "prevResult", "runtimeConfig",
                                "capabilities", "args", "ipam", "dns", "ports", "mtu", "cni.dev/valid-attachments")})
ENVS = st.fixed_dictionaries(
    {"CNI_COMMAND": st.one_of(st.sampled_from(sorted(cp.COMMANDS)), st.text(max_size=6))},
    optional={"CNI_CONTAINERID": st.one_of(st.just("abc123"), st.text(max_size=20)),
              "CNI_IFNAME": st.one_of(st.just("eth0"), st.text(max_size=20)),
              "CNI_NETNS": st.sampled_from(["/", "/nonexistent", ""]),
              "CNI_ARGS": st.one_of(st.just("K8S_POD_NAME=web;IP=10.1.0.9;MAC=zz"), st.text(max_size=30)),
              "CNI_PATH": st.text(max_size=10)})


def test_generated_cni_requests_get_a_result_or_a_cni_error_never_an_internal_error(tmp_path, no_dataplane) -> None:
    """Unit level (no socket): `handle` on generated env and config, ADD's namespace existing (`/`)."""
    server = fake_cni_server(str(tmp_path / "unused.sock"))
    loop = asyncio.new_event_loop()

    @settings(max_examples=examples(400), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(env=ENVS, config=st.one_of(CONFIG, JUNK), raw=st.one_of(st.none(), st.binary(max_size=40)))
    def fuzz(env: dict[str, str], config: Any, raw: bytes | None) -> None:
        stdin = raw if raw is not None else json.dumps(config).encode()
        code, out = loop.run_until_complete(server.handle(env, stdin))
        if code == 0:
            return
        body = json.loads(out)
        assert isinstance(body.get("code"), int) and isinstance(body.get("msg"), str), body
        assert "internal error" not in body["msg"], f"env={env!r} stdin={stdin!r}: {body}"

    try:
        fuzz()
    finally:
        loop.close()


# --- the tether-cni executable ------------------------------------------------------------------

def run_plugin(env: dict[str, str | bytes], stdin: bytes) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cmd = [sys.executable, "-I", "-S", cni_exe.__file__]
    envb = {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in {**full, **env}.items()}
    return subprocess.run(cmd, input=stdin, env=envb, capture_output=True, timeout=30)  # type: ignore[arg-type]


def assert_plugin_answer(r: subprocess.CompletedProcess) -> None:
    assert b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")[-1500:]
    body = json.loads(r.stdout) if r.stdout else None
    if r.returncode == 0:
        assert body is None or isinstance(body, dict), r.stdout
        return
    assert isinstance(body, dict) and isinstance(body.get("code"), int) and isinstance(body.get("msg"), str), \
        (r.returncode, r.stdout, r.stderr[-500:])


PLUGIN_CASES = {
    "VERSION with a backslash in cniVersion": ({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0\\"x"}'),
    "VERSION with a quote-breaking cniVersion": ({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0\\u0022}"}'),
    "VERSION with garbage stdin": ({"CNI_COMMAND": "VERSION"}, b"\xff\xfe\x00"),
    "ADD with no agent": ({**ENV, "CNI_NETNS": "/", "TETHER_CNI_SOCKET": "/nonexistent/cni.sock"},
                          json.dumps(CONF).encode()),
    "ADD with no agent and a quote in cniVersion": (
        {**ENV, "TETHER_CNI_SOCKET": "/nonexistent/cni.sock"}, b'{"cniVersion": "1.0.0\\"", "name": "b"}'),
    "STATUS with no agent": ({"CNI_COMMAND": "STATUS", "TETHER_CNI_SOCKET": "/nonexistent/cni.sock"},
                             json.dumps({**CONF, "cniVersion": "1.1.0"}).encode()),
    "env value not UTF-8": ({**ENV, "CNI_ARGS": b"K8S_POD_NAME=\xff\xfe", "TETHER_CNI_SOCKET": "/nonexistent/x"},
                            json.dumps(CONF).encode()),
    "no env at all": ({"TETHER_CNI_SOCKET": "/nonexistent/cni.sock"}, json.dumps(CONF).encode()),
    "agent_socket not a string": ({**ENV}, json.dumps({**CONF, "agent_socket": 5}).encode()),
}


@pytest.mark.parametrize("name", sorted(PLUGIN_CASES))
def test_tether_cni_answers_a_cni_object_for_malformed_stdin_and_env(name) -> None:
    env, stdin = PLUGIN_CASES[name]
    assert_plugin_answer(run_plugin(env, stdin))


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_tether_cni_through_a_live_agent_socket_answers_a_cni_object(cni, name) -> None:
    """The executable against the agent's socket, with the stdin of each malformed frame case."""
    data = FRAMES[name]
    stdin = data[-40:]
    r = run_plugin({**ENV, "CNI_NETNS": "/", "TETHER_CNI_SOCKET": cni.server.path}, stdin)
    assert_plugin_answer(r)
