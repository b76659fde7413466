"""The agent reports what it could not apply on its host, only when that changes (each write is a
Host event every agent receives), and logs each failed kernel operation once at WARNING."""

from __future__ import annotations

import asyncio
import json
import logging

from tether.agent.main import Agent, AgentConfig
from tether.calc.plan import Quarantined


def agent(tmp_path) -> tuple[Agent, list]:
    cfg = AgentConfig(server="http://127.0.0.1:9", host="h1", underlay_ip="198.18.0.1", state_dir=str(tmp_path),
                      cni_socket=str(tmp_path / "cni.sock"), underlay=("eth0", 1500, "198.18.0.0/24"))
    a = Agent(cfg)
    sent: list = []

    async def request(method: str, path: str, **kw) -> dict:
        sent.append((method, path, json.loads(kw["content"])))
        return {}

    a.client.request = request  # type: ignore[method-assign]
    a.connected = True
    return a, sent


def test_status_is_written_when_it_changes_and_not_on_every_apply(tmp_path, caplog) -> None:
    async def run() -> list:
        a, sent = agent(tmp_path)
        a._quarantined = (Quarantined("Endpoint", "e1", "mac 'x' is not a MAC address"),)
        with caplog.at_level(logging.WARNING, logger="tether.agent"):
            for _ in range(3):
                a._note_failures(["route 10.1.0.0/26 via 198.18.1.3 dev eth0: Network is unreachable"])
                await a._report_status(7, 0)
        a._note_failures([])
        await a._report_status(8, 0)
        await a._report_status(9, 0)
        await a.client.close()
        return sent

    sent = asyncio.run(run())
    assert [(m, p) for m, p, _ in sent] == [("PUT", "/api/v1/hosts/h1/status")] * 2
    first, second = sent[0][2], sent[1][2]
    assert first["problems"][0]["name"] == "e1" and first["applied_revision"] == 7
    assert first["failed_ops"] == [{"kind": "operation", "name": "route 10.1.0.0/26 via 198.18.1.3 dev eth0",
                                    "reason": "Network is unreachable", "since": first["failed_ops"][0]["since"]}]
    assert second["failed_ops"] == [] and second["problems"][0]["since"] == first["problems"][0]["since"]
    failed = [r for r in caplog.records if "kernel operation failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING


def test_an_applied_change_is_reported_with_its_revision_at_most_every_interval(tmp_path, monkeypatch) -> None:
    """The programming status needs each applied revision; a burst of applies writes the first at
    once and the last one interval later, never one per apply (each write is an event every agent
    receives); meanwhile each new revision goes to the server in a heartbeat at once."""
    import tether.agent.main as agent_main

    monkeypatch.setattr(agent_main, "STATUS_INTERVAL", 0.1)

    async def run() -> list:
        a, sent = agent(tmp_path)
        await a._report_status(10, 10)
        for rev in (11, 12, 13):
            a.replica.revision = a.replica.acted = a.applied_revision = rev
            a._applied_kicks = a._kicks
            a._beat_now.clear()
            await a._report_status(rev, rev)
            assert a._beat_now.is_set(), "the new applied revision waits for the next heartbeat"
        assert len(sent) == 1
        await asyncio.sleep(0.3)
        await a._report_status(13, 13)  # nothing new since
        await a.client.close()
        return sent

    sent = asyncio.run(run())
    assert [s[2]["applied_revision"] for s in sent] == [10, 13]


def test_the_status_write_interval_grows_with_the_hosts_so_the_cluster_writes_a_bounded_rate() -> None:
    """Each revision-only status write is an event every agent receives: at 100 hosts a 10 s interval
    was 10 events a second to each agent; the interval grows so the cluster writes at most
    STATUS_WRITES_PER_S of them a second."""
    from tether.agent.main import STATUS_INTERVAL, STATUS_WRITES_PER_S, status_interval

    assert status_interval(3) == status_interval(20) == STATUS_INTERVAL
    for hosts in (100, 1000):
        assert hosts / status_interval(hosts) <= STATUS_WRITES_PER_S
