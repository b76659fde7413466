"""Schema-driven fuzzing of the whole HTTP API (/api/v1 and the Neutron /v2.0 routes, as
/openapi.json describes them): no request gets a 5xx, and no refused request changes the store.

Schemathesis generates each operation's requests from the OpenAPI schema, both conforming
(positive) and violating it (negative, for operations with a body). Half the generated requests
name objects of a small baseline cluster instead of random names, so they get past the 404s; the
baseline is restored after each accepted write. Examples per operation and mode: 40 in CI (over
2,000 requests in all, derandomized, so a CI failure reproduces), times TETHER_FUZZ_SCALE.
The streaming /api/v1/watch is left out (a 200 never ends); its parameters are checked in
tests/server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fuzz import baseline
from tests.fuzz.checks import SENT, checked
from tests.fuzz.harness import InProcessServer, examples

PER_OPERATION = 40
SKIPPED_PATHS = {"/api/v1/watch"}  # streams forever on success
# Long-poll parameters: a generated `wait=29` holds the request that long when nothing matches
# (the fuzz then spends minutes sleeping); the cap keeps the parameter exercised, not the clock.
LONG_POLL_CAP = {("/api/v1/flows", "wait"): 0.05}


def _operations() -> list[tuple[str, str, bool]]:
    import tempfile

    srv = InProcessServer(tempfile.mkdtemp(prefix="tether-fuzz-schema-"))
    try:
        spec = srv.app.openapi()
    finally:
        srv.close()
    out = []
    for path, methods in spec["paths"].items():
        if path in SKIPPED_PATHS:
            continue
        for method, op in methods.items():
            out.append((method.upper(), path, "requestBody" in op))
    return out


SPEC_OPERATIONS = _operations()
CASES = [(m, p, mode) for m, p, has_body in SPEC_OPERATIONS
         for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_body else [GenerationMode.POSITIVE])]


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[InProcessServer]:
    s = InProcessServer(str(tmp_path_factory.mktemp("fuzz-api")))
    try:
        yield s
    finally:
        print(f"\nAPI fuzz: {SENT['requests']} generated requests; all responses (baseline's included) by status "
              f"{dict(sorted(s.statuses.items()))}")
        s.close()


@pytest.fixture(scope="module")
def schema(srv):
    return schemathesis.openapi.from_dict(srv.app.openapi())


def _send(srv: InProcessServer, kw: dict[str, Any]):
    headers = {k: v for k, v in (kw.get("headers") or {}).items()
               if k.lower() not in ("connection", "accept-encoding", "user-agent")}
    extra: dict[str, Any] = {}
    if "json" in kw:
        extra["json"] = kw["json"]
    elif kw.get("data") is not None:
        data = kw["data"]
        extra["content"] = data if isinstance(data, bytes) else str(data).encode()
    url = kw["url"].removeprefix("http://tether")
    return url, extra, lambda: srv.request(kw["method"], url, headers=headers, params=kw.get("params") or None,
                                           **extra)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_request_gets_a_5xx_and_no_refused_request_changes_the_store(srv, schema, method, path, mode) -> None:
    operation = schema[path][method]
    state = {"known": baseline.ensure(srv), "revision": srv.state()[0]}

    @settings(max_examples=examples(PER_OPERATION), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), use_known=st.booleans())
    def fuzz(case, use_known: bool) -> None:
        if srv.state()[0] != state["revision"]:  # the last request wrote: restore what it removed
            state["known"] = baseline.ensure(srv)
            state["revision"] = srv.state()[0]
        if use_known and case.path_parameters:
            # ids come from the store (clients may set some): quoted, as an HTTP client would send them
            known = {k: quote(v, safe="/" if k == "handle" else "") for k, v in state["known"].get(path, {}).items()}
            case.path_parameters = {**case.path_parameters, **known}
        kw = case.as_transport_kwargs(base_url="http://tether")
        for (p, name), cap in LONG_POLL_CAP.items():
            v = (kw.get("params") or {}).get(name)
            if p == path and isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
                kw["params"][name] = cap
        url, extra, send = _send(srv, kw)
        body = extra.get("json", extra.get("content", b"").decode("utf-8", "replace") if extra else None)
        if kw.get("params"):
            url += "?" + "&".join(f"{k}={json.dumps(v)}" for k, v in kw["params"].items())
        checked(srv, method, url, body, send)

    fuzz()
