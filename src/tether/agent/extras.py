"""Optional agent services (DNS, flow log, VM ports, Docker plugin, path health), listed in `EXTRAS`.

Each is started by `async start(agent) -> list[Extra]`, `agent` being what `AgentHandle` lists of
the agent (the CNI server and the Docker driver, VM ports take only its `LocalEndpoints` and client
from it). Every returned object has `async close()`
and `update(replica)`, called on the event loop after each applied plan. An object whose update is
O(objects) also has `prepare(view)` (`Preparing`), which the agent calls instead on its apply thread
with the apply's copy of the replica; it returns None (nothing changed) or a function that the agent
then runs on the event loop to install the result.

Each service is imported only when the agent starts them, one by one: a service that cannot be
imported (a dependency missing from this build) or fails to start is logged at WARNING with the
reason and skipped, so one broken service never stops the datapath.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from tether.agent.config import AgentConfig
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica
from tether.client import AsyncTetherClient

log = logging.getLogger("tether.agent")


class AgentHandle(Protocol):
    """What an extra may use of the agent (`tether.agent.main.Agent` has it)."""

    cfg: AgentConfig
    host: str
    underlay_mtu: int
    replica: Replica  # read only: the front ends change it through `local`
    local: LocalEndpoints
    client: AsyncTetherClient
    connected: bool  # following the server's watch
    dns_ip: str | None  # set by the DNS extra: the address pods are told to ask


class Extra(Protocol):
    async def close(self) -> None: ...

    def update(self, replica: Replica) -> None: ...


@runtime_checkable
class Preparing(Protocol):
    """An extra whose update is prepared off the event loop (see the module's docstring)."""

    def prepare(self, view: Replica) -> Callable[[], None] | None: ...


Start = Callable[[AgentHandle], Awaitable[Sequence[Extra]]]


def _dns() -> Start:
    from tether.agent.dns import start

    return start


def _flow_log() -> Start:
    from tether.agent.flowlog import start

    return start


def _vm_ports() -> Start:
    from tether.agent.vmports import start

    return start


def _docker() -> Start:
    from tether.agent.docker.driver import start

    return start


def _path_health() -> Start:
    from tether.agent.peers import start

    return start


# in start order: DNS first, so that the host registers with its DNS address
EXTRAS: tuple[tuple[str, Callable[[], Start]], ...] = (
    ("DNS", _dns), ("flow log", _flow_log), ("VM ports", _vm_ports), ("Docker plugin", _docker),
    ("path health", _path_health))


async def start(agent: AgentHandle, extras: Sequence[tuple[str, Callable[[], Start]]] = EXTRAS) -> list[Extra]:
    started: list[Extra] = []
    for name, load in extras:
        try:
            start_one = load()
        except Exception as e:  # noqa: BLE001 - optional: the datapath must keep running
            log.warning("optional service %s is not available (cannot import it: %s: %s); the agent runs "
                        "without it", name, type(e).__name__, e, exc_info=True)
            continue
        try:
            started.extend(await start_one(agent))
        except Exception as e:  # noqa: BLE001 - optional: the datapath must keep running
            log.warning("optional service %s failed to start (%s: %s); the agent runs without it", name,
                        type(e).__name__, e, exc_info=True)
    return started
