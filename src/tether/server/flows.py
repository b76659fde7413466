"""The server's flow ring (issue 25, `tether.flows` has the design): records agents push, named
from the desired state when they arrive, kept in memory (bounded; a restart forgets them, as
Hubble's ring does) and read by GET /api/v1/flows with filters and a cursor for --follow."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from tether.flows import Names, is_noise, matches, policy_of_prefix, unpack_group
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Router, SecurityGroup, Service

RING = 20_000  # records kept, all hosts together
PUSH_MAX = 1000  # records per push, as they are
PUSH_ROWS = 10_000  # grouped records per push (`tether.flows.pack`)
SCALARS = {str, int, float, bool}
MEMO_MAX = 50_000  # names and decisions kept between pushes, until the desired state changes


class FlowRing:
    def __init__(self, size: int = RING) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self.changed = asyncio.Event()
        # what naming needs, as of a store revision: read again only when the desired state
        # changed, not for every push of every host (a push a second per host)
        self._revision: int | None = None
        self._names: Names | None = None
        self._lists: dict[type, list] = {}
        self._world: Any = None
        self._described: dict[str, dict[str, Any]] = {}
        self._decided: dict[tuple, Any] = {}

    async def _state(self, objs: Any) -> None:
        revision = await objs.store.revision()
        if revision == self._revision and len(self._described) + len(self._decided) < MEMO_MAX:
            return
        lists = {cls: await objs.list(cls) for cls in (Endpoint, Service, Network, Host)}
        self._names = Names.of(lists[Endpoint], lists[Service], lists[Network],
                               {h.name: h.underlay_ip for h in lists[Host]})
        self._revision, self._lists, self._world = revision, lists, None
        self._described, self._decided = {}, {}

    def _describe(self, ip: str) -> dict[str, Any]:
        d = self._described.get(ip)
        if d is None:
            assert self._names is not None
            d = self._described[ip] = self._names.describe(ip)
        return d

    async def _annotate(self, objs: Any, r: dict[str, Any]) -> None:
        """Both ends' names, and the policy that decided (a denied packet's from its log prefix)."""
        from tether.policy_eval import World, decide

        r["from"] = self._describe(str(r.get("src", "")))
        r["to"] = self._describe(str(r.get("dst", "")))
        if r.get("backend"):
            r["backend_of"] = self._describe(str(r["backend"]))
        if r.get("verdict") == "deny":
            r["policy"] = policy_of_prefix(str(r.get("reason", "")))
        elif r.get("proto") in ("tcp", "udp", "sctp"):
            target = str(r.get("backend") or r.get("dst", ""))
            try:
                port = int(r.get("backend_port") or r.get("dport") or 0)
            except (TypeError, ValueError):  # a port that is not a number: nothing to judge
                return
            key = (str(r.get("src", "")), target, port, str(r["proto"]).upper())
            if key not in self._decided:
                if self._world is None:
                    lists = self._lists
                    self._world = World(lists[Endpoint], await objs.list(Namespace), await objs.list(NetworkPolicy),
                                        await objs.list(SecurityGroup), lists[Network], lists[Host],
                                        await objs.list(Router))
                try:
                    self._decided[key] = decide(self._world, *key)
                except Exception:  # noqa: BLE001 - naming is best effort; the record stays
                    self._decided[key] = None
            if self._decided[key] is not None:
                r["policy"], r["reason"] = self._decided[key].policy, self._decided[key].reason

    async def ingest(self, objs: Any, host: str, records: list[dict[str, Any]], groups: list[Any] = ()) -> int:
        """Name both ends of each record and keep it; returns how many were kept. `groups`
        (`tether.flows.pack`) are named and judged once per group."""
        records = [r for r in records[:PUSH_MAX] if isinstance(r, dict) and not is_noise(r)]
        if not records and not groups:
            return 0
        await self._state(objs)
        kept = 0
        seq, keep = self._seq, self.records.append
        for r in records:
            # plain values only, strings short (a scalar's type, not isinstance: the hot path of a push)
            r = {k: v for k, v in r.items() if type(v) in SCALARS and (type(v) is not str or len(v) < 300)}
            r["reporter"] = host
            await self._annotate(objs, r)
            r["seq"] = next(seq)
            keep(r)
            kept += 1
        room = PUSH_ROWS
        for g in groups:
            common, columns, rows = unpack_group(g, room)
            if not rows or is_noise(common):
                continue
            room -= len(rows)
            common["reporter"] = host
            await self._annotate(objs, common)
            for row in rows:
                r = common.copy()
                r.update(zip(columns, row, strict=True))
                r["seq"] = next(seq)
                keep(r)
            kept += len(rows)
        if kept:
            self.changed.set()
            self.changed = asyncio.Event()
        return kept

    def query(self, after: int = 0, limit: int = 200, src: str | None = None, dst: str | None = None,
              verdict: str | None = None) -> list[dict[str, Any]]:
        out = [r for r in self.records if r["seq"] > after and matches(r, src, dst, verdict)]
        return out[-limit:]
