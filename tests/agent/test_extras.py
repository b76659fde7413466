"""Optional agent services: one that cannot be imported or fails to start is logged with the reason
at WARNING, and the others still start."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tether.agent import extras


class Service:
    async def close(self) -> None: ...

    def update(self, replica: Any) -> None: ...


def test_every_service_is_listed_and_loads_in_this_build() -> None:
    names = [name for name, _ in extras.EXTRAS]
    assert names == ["DNS", "flow log", "VM ports", "Docker plugin", "path health"]
    for _, load in extras.EXTRAS:
        assert callable(load())


def test_a_service_that_cannot_load_or_start_is_logged_with_its_reason_and_the_others_start(caplog) -> None:
    ok = Service()

    def missing() -> extras.Start:
        raise ModuleNotFoundError("No module named 'dns'", name="dns")

    async def broken(agent: Any) -> list[Any]:
        raise OSError("address in use")

    async def fine(agent: Any) -> list[Any]:
        return [ok]

    caplog.set_level(logging.WARNING, "tether.agent")
    started = asyncio.run(extras.start(object(), [("DNS", missing), ("flow log", lambda: broken),  # type: ignore[arg-type]
                                                  ("VM ports", lambda: fine)]))
    assert started == [ok]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("DNS" in m and "No module named 'dns'" in m for m in warnings), warnings
    assert any("flow log" in m and "address in use" in m for m in warnings), warnings


def test_a_service_that_prepares_off_the_event_loop_is_told_apart() -> None:
    class Preparing(Service):
        def prepare(self, view: Any) -> None:
            return None

    assert isinstance(Preparing(), extras.Preparing) and not isinstance(Service(), extras.Preparing)


def test_a_failing_extra_update_is_logged_once_until_its_error_changes(caplog) -> None:
    import logging

    from tether.agent.main import Agent

    agent = Agent.__new__(Agent)  # only the logging state is exercised
    agent._extra_errors = {}
    with caplog.at_level(logging.ERROR, logger="tether.agent"):
        for _ in range(3):
            agent._extra_failed("DnsServer", RuntimeError("worker gone"))
        agent._extra_failed("DnsServer", RuntimeError("socket closed"))
    assert [r.getMessage() for r in caplog.records if "DnsServer" in r.getMessage()] == [
        "updating DnsServer failed (logged once until the error changes)"] * 2
