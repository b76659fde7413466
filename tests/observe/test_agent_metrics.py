"""Agent metrics on a TCP address (issue 25): `--metrics-listen` serves Prometheus text over HTTP,
with the flow, apply and drop counters; the TCP listener answers metrics only (the flow records and
the recording switch stay on the local socket)."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from tether.agent.flowlog import FlowLog
from tether.lab.cluster import free_port


def test_metrics_are_served_on_the_tcp_address_and_nothing_else_is(tmp_path) -> None:
    port = free_port()

    async def run() -> tuple[bytes, bytes]:
        agent = SimpleNamespace(cfg=SimpleNamespace(metrics_listen=f"127.0.0.1:{port}", flows=False), applies=3,
                                applied_revision=42, _plan_ms=1.5, connected=True)
        f = FlowLog("h1", str(tmp_path / "flows.sock"), agent=agent)
        await f.start()
        try:
            async def ask(line: bytes) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(line)
                await w.drain()
                out = await r.read()
                w.close()
                return out

            return await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), await ask(b'{"cmd": "flows"}\n')
        finally:
            await f.close()

    metrics, other = asyncio.run(run())
    assert metrics.startswith(b"HTTP/1.0 200 OK")
    text = metrics.decode()
    for line in ('tether_agent_applies_total{host="h1"} 3', 'tether_agent_applied_revision{host="h1"} 42',
                 'tether_flows_recorded_total{host="h1",verdict="allow"} 0', 'tether_agent_connected{host="h1"} 1',
                 "# TYPE tether_policy_dropped_packets_total counter"):
        assert line in text, line
    assert other.startswith(b"HTTP/1.0 405"), other
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the listener outlived close()"


def test_the_grafana_dashboard_uses_only_metrics_tether_exports() -> None:
    import json
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    dash = json.loads((root / "deploy/monitoring/grafana-dashboard.json").read_text())
    source = "".join(p.read_text() for p in (root / "src/tether").rglob("*.py"))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {re.sub(r"_(bucket|total)$", "", n) for e in exprs for n in re.findall(r"tether_\w+", e)}
    assert len(names) >= 8
    for n in names:
        assert n in source, f"the dashboard queries {n}, which nothing exports"


def test_peer_health_is_exported_per_peer() -> None:
    from tether.agent.flowlog import peer_metrics
    from tether.agent.peers import PeerHealth

    h = PeerHealth(None)
    h.results = {"h3": {"peer": "h3", "underlay": {"ok": True, "rtt_ms": 0.4}, "path_mtu": 1400,
                        "problems": ["network n sends 1500-byte packets to h3"]}}
    text = "\n".join(peer_metrics("h1", SimpleNamespace(_extras=[h])))
    for line in ('tether_peer_up{host="h1",peer="h3"} 1', 'tether_peer_rtt_milliseconds{host="h1",peer="h3"} 0.4',
                 'tether_peer_path_mtu_bytes{host="h1",peer="h3"} 1400', 'tether_peer_problems{host="h1",peer="h3"} 1'):
        assert line in text, line
