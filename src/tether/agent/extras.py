"""Optional agent services (DNS, flow log, metrics...) that live in their own modules.

Each module listed in `MODULES` exposes `async def start(agent) -> list[object]`; every returned
object has `async close()` and `update(replica)`, called on the event loop after each applied plan.
An object whose update is O(objects) also has `prepare(view)`, which the agent calls instead on its
apply thread with the apply's copy of the replica; it returns None (nothing changed) or a function
that the agent then runs on the event loop to install the result. A module that is
absent or fails to start is logged and skipped, so one broken service never stops the datapath.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger("tether.agent")

MODULES = ("tether.agent.dns", "tether.agent.flowlog", "tether.agent.vmports", "tether.agent.docker.driver",
           "tether.agent.peers")


async def start(agent: Any) -> list[Any]:
    started: list[Any] = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                log.exception("optional service %s cannot be imported", name)
            continue
        try:
            started.extend(await mod.start(agent))
        except Exception:  # noqa: BLE001 - optional: the datapath must keep running
            log.exception("optional service %s failed to start", name)
    return started
