"""The fuzzers' two checks on every request: no 5xx, and a refused request (4xx) writes nothing.

Strict by default (the test fails on the first finding and Hypothesis shrinks it). With
TETHER_FUZZ_FINDINGS=<file> each finding is appended to that file as a JSON line instead, so a
long run lists every distinct finding at once (for triage, not for CI)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import httpx

from tests.fuzz.harness import InProcessServer

FINDINGS = os.environ.get("TETHER_FUZZ_FINDINGS")
SENT = {"requests": 0}  # generated requests checked in this process (the baseline's are not counted)


def describe(method: str, url: str, body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, default=repr) if body is not None else ""
    return f"{method} {url} {text[:600]}".strip()


def report(kind: str, request: str, response: httpx.Response) -> None:
    message = f"{kind}: {request} -> {response.status_code} {response.text[:600]}"
    if FINDINGS:
        with open(FINDINGS, "a") as f:
            f.write(json.dumps({"kind": kind, "request": request, "status": response.status_code,
                                "response": response.text[:600]}) + "\n")
        return
    raise AssertionError(message)


def finding(kind: str, message: str) -> None:
    """A failed property: raised, or appended to TETHER_FUZZ_FINDINGS."""
    if FINDINGS:
        with open(FINDINGS, "a") as f:
            f.write(json.dumps({"kind": kind, "message": message}) + "\n")
        return
    raise AssertionError(message)


def changes_by_request(before: tuple, after: tuple) -> list[tuple[str, int, int]]:
    """The keys written between two `InProcessServer.state()` readings, leaving out leased keys
    that disappeared: the store expires a heartbeat's lease by itself, whatever the request."""
    if before == after:
        return []
    gone_leased = {k for k in set(before[1]) - set(after[1]) if k[2] and k[0] not in {a[0] for a in after[1]}}
    return sorted((set(after[1]) ^ set(before[1])) - gone_leased)


def checked(srv: InProcessServer, method: str, url: str, body_desc: Any,
            send: Callable[[], httpx.Response]) -> httpx.Response:
    """Send one request and apply both checks."""
    before = srv.state()
    response = send()
    SENT["requests"] += 1
    request = describe(method, url, body_desc)
    if response.status_code >= 500:
        report("server error", request, response)
    elif 400 <= response.status_code < 500:
        changed = changes_by_request(before, srv.state())
        if changed:
            report(f"refused request changed the store (keys {changed[:6]})", request, response)
    return response
