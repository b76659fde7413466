"""IP address management over the store: blocks with host affinity, claimed with compare-and-swap.

A network's CIDRs are carved into blocks (default /26). A host allocates from its own blocks first,
claims a free block when they are full, and borrows from another host's block only when the network
has no free block left. Allocation does not write by itself: it returns the compares and puts that
reserve the address, and the caller commits them in the *same* transaction as the endpoint that owns
the address, so there is never an address without its endpoint or the reverse. On `Conflict` the
caller calls `invalidate()` and retries.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from tether.model import PREFIX, Block, Network, Subnet, encode, key_of, now
from tether.store.base import Compare, Delete, Op, Put, Store

log = logging.getLogger(__name__)

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
UNBOUND = "_unbound"  # affinity for endpoints that have no host (e.g. an unbound Neutron port)


class IpamError(Exception):
    """An allocation that cannot be made; `status` is the HTTP status the API should answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def block_name(network: str, cidr: str) -> str:
    return f"{network}:{cidr.replace('/', '_')}"


def block_prefix(network: str) -> str:
    return key_of("Block", f"{network}:")


def inside(cidr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """`cidr` lies in `net`; False across address families (a dual-stack network has both)."""
    block = ipaddress.ip_network(cidr)
    return block.version == net.version and block.subnet_of(net)  # type: ignore[arg-type]


def block_length(net: IPNet, block_size: int) -> int:
    """Prefix length of blocks for `net`: `block_size` for IPv4, the same number of addresses for IPv6."""
    want = block_size if net.version == 4 else 128 - (32 - block_size)
    return max(want, net.prefixlen)


def reserved_in(subnet: Subnet) -> set[str]:
    net = ipaddress.ip_network(subnet.cidr)
    out = set()
    if net.num_addresses > 2:
        out.add(str(net.network_address))
        if net.version == 4:
            out.add(str(net.broadcast_address))
    if subnet.gateway:
        out.add(subnet.gateway)
    return out


def in_pools(subnet: Subnet, ip: IPAddr) -> bool:
    if not subnet.pools:
        return True
    for pool in subnet.pools:
        start, _, end = pool.partition("-")
        if ipaddress.ip_address(start.strip()) <= ip <= ipaddress.ip_address((end or start).strip()):
            return True
    return False


def subnet_of(network: Network, ip: IPAddr) -> Subnet | None:
    for s in network.subnets:
        if ip in ipaddress.ip_network(s.cidr):
            return s
    return None


def candidate_blocks(network: Network, subnet: Subnet) -> Iterator[IPNet]:
    net = ipaddress.ip_network(subnet.cidr)
    yield from net.subnets(new_prefix=block_length(net, network.block_size))


def free_addresses(block: Block, subnet: Subnet) -> Iterator[str]:
    net = ipaddress.ip_network(block.cidr)
    taken = block.allocations
    if len(taken) + len(block.reserved) >= net.num_addresses:
        return  # full: a host holds dozens of full blocks, and walking each one made allocation O(n)
    reserved = set(block.reserved)
    for ip in net:
        s = str(ip)
        if s not in taken and s not in reserved and in_pools(subnet, ip):
            yield s


@dataclass
class Allocation:
    """What to commit together with the endpoint: the addresses and the block writes."""

    ips: list[str] = field(default_factory=list)
    compares: list[Compare] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    blocks: dict[str, Block] = field(default_factory=dict)  # key -> updated block


class Ipam:
    """Allocation planning with a per-process cache of blocks (validated by CAS on commit)."""

    def __init__(self, store: Store, *, empty_grace: float = 300.0) -> None:
        self.store = store
        self.empty_grace = empty_grace
        self._cache: dict[str, dict[str, tuple[int, Block]]] = {}  # network -> key -> (mod_rev, block)

    def invalidate(self, network: str | None = None) -> None:
        if network is None:
            self._cache.clear()
        else:
            self._cache.pop(network, None)

    async def blocks(self, network: str) -> dict[str, tuple[int, Block]]:
        cached = self._cache.get(network)
        if cached is not None:
            return cached
        listed = await self.store.list(block_prefix(network))
        blocks = {kv.key: (kv.mod_revision, Block.model_validate_json(kv.value)) for kv in listed.items}
        self._cache[network] = blocks
        return blocks

    def committed(self, alloc: Allocation, revision: int) -> None:
        """Record in the cache the block writes of a committed allocation or release."""
        for key, block in alloc.blocks.items():
            per = self._cache.get(block.network)
            if per is None:
                continue
            if key in {op.key for op in alloc.ops if isinstance(op, Delete)}:
                per.pop(key, None)
            else:
                per[key] = (revision, block)

    # --- allocation -----------------------------------------------------------------------------

    async def allocate(
        self, network: Network, host: str | None, handle: str, requested: Iterable[str] = ()
    ) -> Allocation:
        """Plan one address per IP family of the network (or exactly the requested addresses)."""
        host = host or UNBOUND
        blocks = await self.blocks(network.name)
        alloc = Allocation()
        working = dict(blocks)  # blocks are copied on first write (see _assign)
        requested = list(requested)
        if requested:
            for ip in requested:
                self._take_static(network, host, handle, ip, working, alloc)
        else:
            families = sorted({ipaddress.ip_network(s.cidr).version for s in network.subnets})
            for version in families:
                subnets = [s for s in network.subnets if ipaddress.ip_network(s.cidr).version == version]
                ip = self._take_dynamic(network, host, handle, subnets, working, alloc)
                if ip is None:
                    in_use = sum(len(b.allocations) for _, b in working.values())
                    raise IpamError(f"network {network.name!r} is full ({in_use} addresses in use)")
        for key, block in alloc.blocks.items():
            alloc.compares.append(Compare(key, working[key][0]))
            alloc.ops.append(Put(key, encode(block)))
        return alloc

    def _new_block(self, network: Network, subnet: Subnet, cidr: IPNet, host: str) -> Block:
        reserved = sorted(ip for ip in reserved_in(subnet) if ipaddress.ip_address(ip) in cidr)
        return Block(name=block_name(network.name, str(cidr)), network=network.name, cidr=str(cidr), host=host,
                     reserved=reserved)

    def _assign(self, key: str, block: Block, ip: str, handle: str, alloc: Allocation) -> str:
        if key not in alloc.blocks:
            block = block.model_copy(deep=True)
        block.allocations[ip] = handle
        block.empty_since = None
        alloc.ips.append(ip)
        alloc.blocks[key] = block
        return ip

    def _take_dynamic(
        self, network: Network, host: str, handle: str, subnets: list[Subnet],
        working: dict[str, tuple[int, Block]], alloc: Allocation,
    ) -> str | None:
        by_cidr = {b.cidr: (k, b) for k, (_, b) in working.items()}
        for subnet in subnets:
            net = ipaddress.ip_network(subnet.cidr)
            mine = [(k, b) for k, b in by_cidr.values()
                    if b.host == host and inside(b.cidr, net)]
            for key, block in sorted(mine, key=lambda kb: ipaddress.ip_network(kb[1].cidr)):
                ip = next(free_addresses(block, subnet), None)
                if ip is not None:
                    return self._assign(key, block, ip, handle, alloc)
        for subnet in subnets:  # claim a free block
            for cidr in candidate_blocks(network, subnet):
                if str(cidr) in by_cidr:
                    continue
                block = self._new_block(network, subnet, cidr, host)
                ip = next(free_addresses(block, subnet), None)
                if ip is None:
                    continue
                key = block.key()
                working[key] = (0, block)
                return self._assign(key, block, ip, handle, alloc)
        for subnet in subnets:  # borrow from another host's block
            net = ipaddress.ip_network(subnet.cidr)
            for key, block in by_cidr.values():
                if not inside(block.cidr, net):
                    continue
                ip = next(free_addresses(block, subnet), None)
                if ip is not None:
                    return self._assign(key, block, ip, handle, alloc)
        return None

    def _take_static(
        self, network: Network, host: str, handle: str, ip_text: str,
        working: dict[str, tuple[int, Block]], alloc: Allocation,
    ) -> None:
        try:
            ip = ipaddress.ip_address(ip_text.split("/")[0])
        except ValueError:
            raise IpamError(f"requested address {ip_text!r} is not an IP address", 400) from None
        subnet = subnet_of(network, ip)
        if subnet is None:
            cidrs = ", ".join(s.cidr for s in network.subnets)
            raise IpamError(f"requested address {ip} is outside network {network.name!r} ({cidrs})", 400)
        if str(ip) in reserved_in(subnet):
            raise IpamError(f"requested address {ip} is reserved in {subnet.cidr} (network, broadcast or gateway)")
        net = ipaddress.ip_network(subnet.cidr)
        cidr = ipaddress.ip_network(f"{ip}/{block_length(net, network.block_size)}", strict=False)
        key = key_of("Block", block_name(network.name, str(cidr)))
        if key in alloc.blocks:
            block = alloc.blocks[key]
        elif key in working:
            block = working[key][1]
        else:
            block = self._new_block(network, subnet, cidr, host)
            working[key] = (0, block)
        holder = block.allocations.get(str(ip))
        if holder is not None and holder != handle:
            raise IpamError(f"address {ip} is already in use in network {network.name!r}")
        self._assign(key, block, str(ip), handle, alloc)

    # --- release --------------------------------------------------------------------------------

    async def release(self, network: str, ips: Iterable[str], handle: str) -> Allocation:
        """Plan the release of `ips` held by `handle` (idempotent: addresses not held are skipped).

        The cache is only trusted where the commit checks it: a cached block that holds the address
        is compared by revision in the transaction (stale: Conflict, and the caller retries); one
        that does not, or no cached block, is read again from the store. (An address allocated
        through another server is in a block this server's cache may not have or not know it
        holds: it stayed allocated until the next GC.)"""
        alloc = Allocation()
        current: dict[str, tuple[int, Block]] = {}
        for ip in ips:
            ip = ip.split("/")[0]
            key = await self._block_key_of(network, ip)
            if key is None:
                continue
            if key not in current:
                cached = self._cache.get(network, {}).get(key)
                if cached is None or cached[1].allocations.get(ip) != handle:
                    kv = await self.store.get(key)
                    if kv is None:
                        continue
                    cached = (kv.mod_revision, Block.model_validate_json(kv.value))
                current[key] = cached
            rev, block = current[key]
            if block.allocations.get(ip) != handle:
                continue
            b = alloc.blocks.get(key) or block.model_copy(deep=True)
            if key not in alloc.blocks:
                alloc.compares.append(Compare(key, rev))
            del b.allocations[ip]
            if not b.allocations:
                b.empty_since = now()
            alloc.blocks[key] = b
            alloc.ips.append(ip)
        for key, b in alloc.blocks.items():
            alloc.ops.append(Put(key, encode(b)))
        return alloc

    async def _block_key_of(self, network: str, ip: str) -> str | None:
        """The key of the block that holds `ip`: found in the cache, else in a fresh listing."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for fresh in (False, True):
            if fresh:
                self.invalidate(network)
            for key, (_, block) in (await self.blocks(network)).items():
                if addr in ipaddress.ip_network(block.cidr):
                    return key
        return None

    async def blocks_all(self) -> dict[str, tuple[int, Block]]:
        listed = await self.store.list(PREFIX + "blocks/")
        return {kv.key: (kv.mod_revision, Block.model_validate_json(kv.value)) for kv in listed.items}

    def empty_blocks_due(self, blocks: dict[str, tuple[int, Block]]) -> list[tuple[str, int]]:
        """Blocks empty for longer than the grace period: they return to the pool."""
        limit = now() - timedelta(seconds=self.empty_grace)
        return [(k, rev) for k, (rev, b) in blocks.items()
                if not b.allocations and b.empty_since is not None and b.empty_since <= limit]


