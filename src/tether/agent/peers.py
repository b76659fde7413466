"""Path health (issue 25): this agent checks every peer host over the underlay and the overlay and
reports it to the server, which `tether status --peers` shows as a matrix.

Every PEER_INTERVAL seconds, per peer and concurrently: an ICMP echo (`agent/icmp.py`: in-process,
no `ping` process) to its underlay address with the full underlay MTU and Don't Fragment
(reachability, latency, and whether full-size packets are carried); when that fails but a small one
passes, the largest size carried (a binary search of a few echoes). When this host and the peer have
VTEPs (a VXLAN network), the overlay too: a full-size echo through this host's VTEP to the peer's VTEP
address (the plan routes each peer's VTEP address over the tunnel, so the reply comes back the same
way): an underlay that answers while the overlay does not is VXLAN blocked on the way (UDP 4789) or a
VTEP missing. The networks this host carries are then checked against the path: a VXLAN network whose
packets, with the 50 bytes of VXLAN overhead (70 over an IPv6 underlay), are larger than the path carries is
reported before users see stalled TCP. A peer whose underlay address is of the other family (IPv4
here, IPv6 there) has no path at all (`calc.host.same_family`): reported as such, not pinged.
Results are pushed to POST /api/v1/hosts/NAME/peers (kept in the server's memory).

A round checks at most PEERS_PER_ROUND peers, PING_CONCURRENCY at a time, taking the next ones in
turn (`next_batch`): checking every peer each round made the cluster's probes grow with hosts
squared (a 100-host lab, when each probe was a `ping` process: ~2,000 processes a second). Beyond
PEERS_PER_ROUND peers a peer's result is refreshed every ceil(peers / PEERS_PER_ROUND) rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from tether.agent.icmp import Pinger

if TYPE_CHECKING:
    from tether.agent.extras import AgentHandle

log = logging.getLogger("tether.agent.peers")

PEER_INTERVAL = 10.0
PEERS_PER_ROUND = 16
PING_CONCURRENCY = 8
MIN_MTU = 576


async def carried_mtu(pinger: Pinger, ip: str, high: int) -> int | None:
    """The largest packet (between MIN_MTU and `high`) that reaches `ip` with DF set; None if none."""
    if await pinger.ping(ip, MIN_MTU) is None:
        return None
    lo, hi = MIN_MTU, high
    while hi - lo > 8:
        mid = (lo + hi) // 2
        if await pinger.ping(ip, mid) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def mtu_problems(networks: list[Any], peer: str, path_mtu: int, underlay_mtu: int,
                 overhead: int | None = None) -> list[str]:
    """Networks whose packets to `peer` are larger than the path carries (pure). `overhead`: VXLAN's
    on this host's underlay (`names.vxlan_overhead`), 50 if not given."""
    from tether.calc.host import endpoint_mtu
    from tether.calc.names import VXLAN_OVERHEAD

    overhead = VXLAN_OVERHEAD if overhead is None else overhead
    out = []
    for net in networks:
        inner = endpoint_mtu(net, underlay_mtu, overhead)
        need = inner + (0 if net.encap == "direct" else overhead)
        if need > path_mtu:
            fit = path_mtu - (0 if net.encap == "direct" else overhead)
            out.append(f"network {net.name} sends {need}-byte packets to {peer} (MTU {inner}"
                       + ("" if net.encap == "direct" else f" + {overhead} VXLAN") +
                       f") but the path carries {path_mtu}: large packets are lost (stalled TCP); set the "
                       f"network's mtu to {fit} or raise the underlay's")
    return out


def unlike_underlays(me: Any, peer: Any) -> str:
    """The problem of two hosts whose underlay addresses are of different families (pure)."""
    fam = {4: "IPv4", 6: "IPv6"}
    mine, theirs = (fam[6 if ":" in h.underlay_ip else 4] for h in (me, peer))
    return (f"{peer.name} has an {theirs} underlay address ({peer.underlay_ip}) and this host an {mine} one "
            f"({me.underlay_ip}): there is no path between them, so pods here cannot reach pods there; give "
            "every host an underlay address of one family (--underlay-ip)")


def next_batch(peers: list[str], after: str | None, size: int = PEERS_PER_ROUND) -> list[str]:
    """The next `size` peer names (sorted) after `after`, wrapping around (pure): successive rounds
    cover every peer in turn, whatever joins or leaves between them."""
    names = sorted(peers)
    if len(names) <= size:
        return names
    start = next((i for i, n in enumerate(names) if after is not None and n > after), 0)
    return (names[start:] + names[:start])[:size]


class PeerHealth:
    def __init__(self, agent: AgentHandle) -> None:
        self.agent = agent
        self.results: dict[str, dict[str, Any]] = {}
        self._replica: Any = None
        self._task: asyncio.Task | None = None
        self._last: str | None = None  # the last peer checked: the next round starts after it
        self._slots = asyncio.Semaphore(PING_CONCURRENCY)
        self.pinger = Pinger()  # its raw sockets open at the first probe

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def update(self, replica: Any) -> None:
        self._replica = replica

    async def check(self, peer: Any, underlay_mtu: int) -> dict[str, Any]:
        from tether.calc.host import same_family
        from tether.calc.names import vxlan_overhead

        r: dict[str, Any] = {"peer": peer.name, "underlay_ip": peer.underlay_ip, "checked_at": time.time()}
        me = self._replica.hosts.get(self.agent.host) if self._replica is not None else None
        if me is not None and not same_family(me, peer):
            r["underlay"] = {"ok": False, "rtt_ms": None}
            r["path_mtu"] = None
            r["problems"] = [unlike_underlays(me, peer)]
            return r
        overhead = vxlan_overhead(me.underlay_ip) if me is not None else None
        rtt = await self.pinger.ping(peer.underlay_ip, underlay_mtu)
        r["underlay"] = {"ok": rtt is not None, "rtt_ms": rtt}
        r["path_mtu"] = (underlay_mtu if rtt is not None
                         else await carried_mtu(self.pinger, peer.underlay_ip, underlay_mtu))
        if r["path_mtu"] is not None:
            r["underlay"]["ok"] = True
        nets = list(getattr(self._replica, "networks", {}).values()) if self._replica is not None else []
        problems = []
        if r["path_mtu"] is None:
            problems.append(f"{peer.name} ({peer.underlay_ip}) does not answer on the underlay")
        else:
            problems += mtu_problems(nets, peer.name, r["path_mtu"], underlay_mtu, overhead)
        if self.overlay_between(peer):
            r["overlay"] = await self.check_overlay(peer.vtep_ip, min(underlay_mtu, r["path_mtu"] or underlay_mtu),
                                                    overhead)
            if not r["overlay"]["ok"] and r["path_mtu"] is not None:
                problems.append(f"{peer.name} answers on the underlay but not through the overlay (its VTEP "
                                f"{peer.vtep_ip}): VXLAN (UDP 4789) is blocked between the hosts, or its VTEP is "
                                "missing; pods on VXLAN networks cannot reach it")
        r["problems"] = problems
        return r

    def overlay_between(self, peer: Any) -> bool:
        """Does the overlay carry pods' packets both ways between this host and `peer`: both have a
        VTEP address and each owns an address block of a network the other reaches through its VTEP
        (the plan routes a peer's VTEP address only then, `calc.host`)."""
        from tether.calc.host import path_mode

        rep = self._replica
        me = rep.hosts.get(self.agent.host) if rep is not None else None
        if me is None or not getattr(me, "vtep_ip", None) or not getattr(peer, "vtep_ip", None):
            return False
        nets = rep.networks

        def tunnelled(owner: Any, sender: Any) -> bool:
            return any(b.host == owner.name and b.network in nets and path_mode(nets[b.network], sender, owner)
                       == "vxlan" for b in rep.blocks)

        return tunnelled(peer, me) and tunnelled(me, peer)

    async def check_overlay(self, vtep_ip: str, path_mtu: int, overhead: int | None = None) -> dict[str, Any]:
        """An echo through the tunnel as large as the path carries once encapsulated (the VTEP's MTU
        is the underlay's minus the overhead); a small one when that is lost, to tell the MTU apart
        from a blocked tunnel."""
        from tether.calc.names import VTEP_NAME, VXLAN_OVERHEAD

        size = path_mtu - (VXLAN_OVERHEAD if overhead is None else overhead)
        rtt = await self.pinger.ping(vtep_ip, size, VTEP_NAME)
        if rtt is not None:
            return {"ok": True, "rtt_ms": rtt, "size": size}
        small = await self.pinger.ping(vtep_ip, MIN_MTU, VTEP_NAME)
        return {"ok": small is not None, "rtt_ms": small, "size": MIN_MTU if small is not None else None}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PEER_INTERVAL if self.results else 2.0)
            a = self.agent
            rep = self._replica
            if rep is None or not getattr(a, "connected", False):
                continue
            me = a.host
            underlay_mtu = a.underlay_mtu
            hosts = {h.name: h for h in rep.objects["Host"].values() if h.name != me}
            batch = next_batch(list(hosts), self._last)
            if batch:
                self._last = batch[-1]
            try:
                fresh = await asyncio.gather(*(self._check_one(hosts[n], underlay_mtu) for n in batch))
                self.results = {n: r for n, r in self.results.items() if n in hosts}  # gone hosts dropped
                self.results.update((r["peer"], r) for r in fresh)
                for r in fresh:
                    for p in r["problems"]:
                        log.warning("path to %s: %s", r["peer"], p)
                await a.client.request("POST", f"/api/v1/hosts/{me}/peers",
                                       content=json.dumps({"peers": list(self.results.values())}))
            except Exception as e:  # noqa: BLE001 - health checks never stop the agent
                log.warning("could not check or report peer health: %s", e)

    async def _check_one(self, peer: Any, underlay_mtu: int) -> dict[str, Any]:
        async with self._slots:
            return await self.check(peer, underlay_mtu)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.pinger.close()


async def start(agent: AgentHandle) -> list[PeerHealth]:
    h = PeerHealth(agent)
    h.start()
    return [h]
