"""Cooperative yield points: the agent's background work steps aside while a pod waits for an answer.

The agent is one process with one GIL. An apply for 500 pods is ~8 ms of pure Python planning plus
netlink work on the apply thread, and a CNI ADD that arrives meanwhile shares the GIL with it
(at best every other switch interval): in bench/cni.py the second of two back-to-back ADDs took
18 ms instead of 9.6. So long background computations call `checkpoint()` between items; while
foreground work is in progress (between `enter()` and `leave()`, on the event loop) a thread inside
`background()` waits there, without the GIL, up to a budget per background section, so a storm of
requests delays an apply by at most that budget and never starves it.

Outside `background()` a checkpoint costs one attribute test and never waits (tests, the CLI).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_idle = threading.Event()
_idle.set()
_active = 0  # foreground sections in progress; changed on the event loop thread only
_budget = threading.local()  # seconds a background thread may still wait in this section


def enter() -> None:
    """Foreground work begins (a CNI request is being answered): background threads pause."""
    global _active
    _active += 1
    _idle.clear()


def leave() -> None:
    global _active
    _active -= 1
    if _active <= 0:
        _active = 0
        _idle.set()


def busy() -> bool:
    return not _idle.is_set()


@contextlib.contextmanager
def background(budget: float = 0.25) -> Iterator[None]:
    """Run the body as background work: its checkpoints wait for foreground work, `budget` seconds
    at most in all."""
    _budget.left = budget
    try:
        yield
    finally:
        _budget.left = 0.0


def checkpoint() -> None:
    """A point where background work may pause: call between items of a long computation. Called
    once per object by plans of 10,000 endpoints: the idle case is one global read (`_active` is
    zero exactly when `_idle` is set), not an Event method call."""
    if not _active:
        return
    left = getattr(_budget, "left", 0.0)
    if left <= 0.0:
        return
    t0 = time.monotonic()
    _idle.wait(left)
    _budget.left = left - (time.monotonic() - t0)
