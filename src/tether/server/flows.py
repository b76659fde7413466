"""The server's flow ring (issue 25, `tether.flows` has the design): records agents push, named
from the desired state when they arrive, kept in memory (bounded; a restart forgets them, as
Hubble's ring does) and read by GET /api/v1/flows with filters and a cursor for --follow."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from tether.flows import Names, is_noise, matches, policy_of_prefix
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Router, SecurityGroup, Service

RING = 20_000  # records kept, all hosts together
PUSH_MAX = 1000  # records per push
SCALARS = {str, int, float, bool}


class FlowRing:
    def __init__(self, size: int = RING) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self.changed = asyncio.Event()

    async def ingest(self, objs: Any, host: str, records: list[dict[str, Any]]) -> int:
        """Name both ends of each record and keep it; returns how many were kept."""
        from tether.policy_eval import World, decide

        records = [r for r in records[:PUSH_MAX] if isinstance(r, dict) and not is_noise(r)]
        if not records:
            return 0
        eps, svcs, nets = await objs.list(Endpoint), await objs.list(Service), await objs.list(Network)
        hosts = await objs.list(Host)
        names = Names.of(eps, svcs, nets, {h.name: h.underlay_ip for h in hosts})
        world: World | None = None
        decided: dict[tuple, Any] = {}  # one decision per (source, target, port, protocol) in a push
        described: dict[str, dict[str, Any]] = {}  # per push: a busy pair of pods repeats its addresses

        def describe(ip: str) -> dict[str, Any]:
            d = described.get(ip)
            if d is None:
                d = described[ip] = names.describe(ip)
            return d

        for r in records:
            # plain values only, strings short (a scalar's type, not isinstance: the hot path of a push)
            r = {k: v for k, v in r.items() if type(v) in SCALARS and (type(v) is not str or len(v) < 300)}
            r["reporter"] = host
            r["from"] = describe(str(r.get("src", "")))
            r["to"] = describe(str(r.get("dst", "")))
            if r.get("backend"):
                r["backend_of"] = describe(str(r["backend"]))
            if r.get("verdict") == "deny":
                r["policy"] = policy_of_prefix(str(r.get("reason", "")))
            elif r.get("proto") in ("tcp", "udp", "sctp"):
                if world is None:
                    world = World(eps, await objs.list(Namespace), await objs.list(NetworkPolicy),
                                  await objs.list(SecurityGroup), nets, hosts, await objs.list(Router))
                target = str(r.get("backend") or r.get("dst", ""))
                port = int(r.get("backend_port") or r.get("dport") or 0)
                key = (str(r.get("src", "")), target, port, str(r["proto"]).upper())
                if key not in decided:
                    try:
                        decided[key] = decide(world, *key)
                    except Exception:  # noqa: BLE001 - naming is best effort; the record stays
                        decided[key] = None
                if decided[key] is not None:
                    r["policy"], r["reason"] = decided[key].policy, decided[key].reason
            r["seq"] = next(self._seq)
            self.records.append(r)
        self.changed.set()
        self.changed = asyncio.Event()
        return len(records)

    def query(self, after: int = 0, limit: int = 200, src: str | None = None, dst: str | None = None,
              verdict: str | None = None) -> list[dict[str, Any]]:
        out = [r for r in self.records if r["seq"] > after and matches(r, src, dst, verdict)]
        return out[-limit:]
