"""Typed reads and transactional writes of model objects, with the index keys that keep names unique.

This is the only place that turns API intentions into store transactions. Every write is one
transaction: the object, its index keys and (for endpoints) its IPAM block updates, so a crash at
any moment leaves either all of it or none of it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from pydantic import ValidationError

from tether.model import (
    DEFAULT_GROUP,
    KINDS,
    PREFIX,
    Endpoint,
    Host,
    Network,
    Obj,
    SecurityGroup,
    Service,
    decode,
    default_group_id,
    default_security_group,
    encode,
    key_of,
    kind_of_key,
    now,
)
from tether.server.ipam import Allocation, Ipam, IpamError
from tether.store.base import Compare, Conflict, Delete, Op, Put, Store

log = logging.getLogger(__name__)
T = TypeVar("T", bound=Obj)
IDX = PREFIX + "idx/"
NETWORK_GUARD = IDX + "network-guard"  # serialises network writes so overlap checks cannot race
HOST_LEASE = PREFIX + "leases/hosts/"
RENEW_SHARE = 4  # a host's lease is renewed when a quarter of its TTL has passed (see Objects.heartbeat)
SERVICE_CIDR6 = "fd96::/112"  # the default IPv6 service range (a ULA; --service-cidr6)
IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Undecodable:
    """A stored object today's validators refuse (written by an older version): passed on as stored,
    so agents can quarantine it and an operator can see and delete it."""

    kind: str
    data: dict
    revision: int = 0

    def model_dump(self, mode: str = "json") -> dict:
        return {**self.data, "revision": self.revision}


def describe_errors(e: ValidationError) -> str:
    """A model's validation errors as 'field: what is wrong' (the shape of the API's 422 answers)."""
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())


class ApiError(Exception):
    """A request that cannot be done; `detail` says what is wrong and how to fix it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def endpoint_name_key(ep: Endpoint) -> str:
    return f"{IDX}endpoint-name/{ep.network}/{ep.namespace}/{ep.name}"


def handle_key(handle: str) -> str:
    return f"{IDX}handle/{handle}"


def vtep_key(ip: str) -> str:
    return f"{IDX}vtep/{ip}"


def interface_key(ifname: str) -> str:
    return f"{IDX}interface/{ifname}"


def octavia_key(lb_id: str) -> str:
    """Where the Octavia API keeps one load balancer's tree (tether.server.octavia)."""
    return f"{PREFIX}octavia/loadbalancers/{lb_id}"


def svcip_key(ip: str) -> str:
    return f"{IDX}service-ip/{ip}"


class Fenced(Conflict):
    """A fenced write whose fence no longer holds (another server leads now): not retried."""


async def with_retries(fn: Callable[[], Awaitable[T]], attempts: int = 50) -> T:
    """Run a read-compute-CAS function until it commits without a conflict."""
    for i in range(attempts):
        try:
            return await fn()
        except Fenced:
            raise
        except Conflict:
            if i == attempts - 1:
                raise ApiError(409, "the store was busy with conflicting writes; retry the request") from None
            await asyncio.sleep(min(0.001 * (2**i), 0.05))
    raise AssertionError("unreachable")


class Objects:
    def __init__(self, store: Store, ipam: Ipam, *, service_cidr: str, vtep_cidr: str,
                 service_cidr6: str = SERVICE_CIDR6) -> None:
        self.store = store
        self.ipam = ipam
        self.service_cidr = ipaddress.ip_network(service_cidr)
        self.service_cidr6 = ipaddress.ip_network(service_cidr6)
        self.vtep_cidr = ipaddress.ip_network(vtep_cidr)
        # per host: when this server last heard its heartbeat, and the revision its agent had applied
        # then. Kept in memory, not written: a write per heartbeat would be an event for every agent.
        self.beats: dict[str, tuple[datetime, int]] = {}
        # per host: the lease this server last renewed for it and when (monotonic), see `heartbeat`
        self.renewed: dict[str, tuple[int, float]] = {}
        # when this server wrote each object's current revision (key -> (revision, time)): the
        # "T ms after write" of the programming status; unknown after a restart or for another replica
        self.written: dict[str, tuple[int, datetime]] = {}
        # registrations on this server take turns: each new host compares the network guard and the
        # VTEP index, so 100 hosts registering at once made one winner per round and the last ones
        # ran out of retries (409 "busy"); other servers' writers still meet the CAS
        self.host_registration = asyncio.Lock()

    def note_written(self, obj: Obj) -> None:
        if len(self.written) > 100_000:
            self.written.clear()
        self.written[obj.key()] = (obj.revision, now())

    def written_at(self, obj: Obj) -> datetime | None:
        hit = self.written.get(obj.key())
        return hit[1] if hit is not None and hit[0] == obj.revision else None

    # --- reads ----------------------------------------------------------------------------------

    async def get(self, cls: type[T], store_name: str) -> T | None:
        kv = await self.store.get(key_of(cls.kind, store_name))
        if kv is None:
            return None
        obj = cls.model_validate_json(kv.value)
        obj.revision = kv.mod_revision
        return obj

    async def stored_as_is(self, cls: type[T], store_name: str) -> tuple[T, str] | None:
        """An object today's validators refuse (stored by an older version, or written around the
        API), built without validation so it can be shown and deleted, with what is wrong with it;
        None if it is absent or valid."""
        kv = await self.store.get(key_of(cls.kind, store_name))
        if kv is None:
            return None
        try:
            cls.model_validate_json(kv.value)
            return None
        except ValidationError as e:
            problem = describe_errors(e)
        try:
            raw = json.loads(kv.value)
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            raw = {}
        fields = {k: v for k, v in raw.items() if k in cls.model_fields}
        obj = cls.model_construct(**{"id": store_name, "name": str(raw.get("name", store_name)), **fields})
        obj.revision = kv.mod_revision
        return obj, problem

    async def must(self, cls: type[T], store_name: str) -> T:
        obj = await self.get(cls, store_name)
        if obj is None:
            raise ApiError(404, f"{cls.kind.lower()} {store_name!r} not found")
        return obj

    async def list(self, cls: type[T], prefix: str = "") -> list[T]:
        listed = await self.store.list(key_of(cls.kind, prefix))
        out = []
        for kv in listed.items:
            try:
                obj = cls.model_validate_json(kv.value)
            except ValidationError as e:  # stored by an older version with looser rules: skipped, not fatal
                log.warning("stored %s %s fails validation and is skipped: %s", cls.kind, kv.key, describe_errors(e))
                continue
            obj.revision = kv.mod_revision
            out.append(obj)
        return out

    async def snapshot(self) -> tuple[int, list[Obj | Undecodable]]:
        listed = await self.store.list(PREFIX)
        objs: list[Obj | Undecodable] = []
        for kv in listed.items:
            kind = kind_of_key(kv.key)
            if kind is None:
                continue
            try:
                obj = decode(kv.key, kv.value)
            except ValidationError:
                objs.append(Undecodable(kind, json.loads(kv.value), kv.mod_revision))
                continue
            if obj is not None:
                obj.revision = kv.mod_revision
                objs.append(obj)
        return listed.revision, objs

    async def endpoint_by_handle(self, handle: str) -> Endpoint | None:
        kv = await self.store.get(handle_key(handle))
        return await self.get(Endpoint, kv.value.decode()) if kv else None

    # --- generic writes -------------------------------------------------------------------------

    async def create(self, obj: T, compares: list[Compare] | None = None, ops: list[Op] | None = None) -> T:
        obj.created_at = now()
        rev = await self.store.txn([Compare(obj.key(), 0), *(compares or [])],
                                   [Put(obj.key(), encode(obj)), *(ops or [])])
        obj.revision = rev
        self.note_written(obj)
        return obj

    async def replace(self, obj: T, revision: int, compares: list[Compare] | None = None,
                      ops: list[Op] | None = None) -> T:
        rev = await self.store.txn([Compare(obj.key(), revision), *(compares or [])],
                                   [Put(obj.key(), encode(obj)), *(ops or [])])
        obj.revision = rev
        self.note_written(obj)
        return obj

    async def remove(self, obj: Obj, compares: list[Compare] | None = None, ops: list[Op] | None = None) -> int:
        return await self.store.txn([Compare(obj.key(), obj.revision), *(compares or [])],
                                    [Delete(obj.key()), *(ops or [])])

    async def upsert(self, obj: T) -> tuple[T, bool]:
        """Create or replace (keeping id and created_at); returns (object, created)."""

        async def attempt() -> tuple[T, bool]:
            old = await self.get(type(obj), obj.store_name())
            if old is None:
                return await self.create(obj), True
            obj.id, obj.created_at = old.id, old.created_at
            return await self.replace(obj, old.revision), False

        return await with_retries(attempt)

    # --- networks -------------------------------------------------------------------------------

    async def put_network(self, net: Network, create_only: bool) -> tuple[Network, bool]:
        async def attempt() -> tuple[Network, bool]:
            guard = await self.store.get(NETWORK_GUARD)
            guard_cmp = Compare(NETWORK_GUARD, guard.mod_revision if guard else 0)
            guard_op = Put(NETWORK_GUARD, b"1")
            others = [n for n in await self.list(Network) if n.name != net.name]
            check_overlap(net, others)
            old = await self.get(Network, net.name)
            from tether.server.validation import check_direct, check_subnet_ranges

            before = {s.cidr for s in old.subnets} if old is not None else set()
            added = [s.cidr for s in net.subnets if s.cidr not in before]  # what existed stays (older data)
            hosts = await self.list(Host) if added or net.encap == "direct" else []
            check_subnet_ranges(net, added, hosts, self.service_cidr, self.vtep_cidr, self.service_cidr6)
            if old is None or old.encap != "direct":
                check_direct(net, hosts)
            if old is None:
                return await self.create(net, [guard_cmp], [guard_op]), True
            if create_only:
                raise ApiError(409, f"network {net.name!r} already exists; use another name, or change it with "
                                    "`tether network update` or `tether apply`")
            if net.block_size != old.block_size and (await self.store.list(key_of("Block", f"{net.name}:"))).items:
                raise ApiError(409, f"network {net.name!r} has IPAM blocks of /{old.block_size} already: its block "
                                    "size cannot change while they exist (delete its endpoints first, or create "
                                    "another network)")
            removed = [ipaddress.ip_network(s.cidr) for s in old.subnets
                       if s.cidr not in {n.cidr for n in net.subnets}]
            if removed:  # adding a subnet is fine; removing one that holds addresses is not
                eps = [e for e in await self.endpoints_in(net.name)
                       if any(ipaddress.ip_address(ip) in r for ip in e.ips for r in removed)]
                if eps:
                    raise ApiError(409, f"network {net.name!r} has {len(eps)} endpoints with addresses in the "
                                        "subnets being removed; its subnets cannot change until they are deleted")
            net.id, net.created_at = old.id, old.created_at
            return await self.replace(net, old.revision, [guard_cmp], [guard_op]), False

        return await with_retries(attempt)

    async def endpoints_in(self, network: str) -> list[Endpoint]:
        return [e for e in await self.list(Endpoint) if e.network == network]

    async def delete_network(self, name: str) -> None:
        async def attempt() -> None:
            net = await self.must(Network, name)
            eps = await self.endpoints_in(name)
            if eps:
                shown = ", ".join(e.name for e in eps[:5]) + (" ..." if len(eps) > 5 else "")
                raise ApiError(409, f"network {name!r} still has {len(eps)} endpoints ({shown}); "
                                    "delete them first (tether endpoint delete) or remove their containers")
            await self.remove(net)

        await with_retries(attempt)
        # Endpoint creation compares the network's revision, so no address can be taken in these
        # blocks any more; delete them in chunks (etcd limits operations per transaction).
        blocks = await self.store.list(key_of("Block", f"{name}:"))
        keys = [kv.key for kv in blocks.items]
        for i in range(0, len(keys), 100):
            await self.store.txn([], [Delete(k) for k in keys[i:i + 100]])
        self.ipam.invalidate(name)

    # --- endpoints ------------------------------------------------------------------------------

    async def create_endpoint(self, ep: Endpoint, *, require_subnet: bool = True) -> tuple[Endpoint, bool]:
        """Create an endpoint with its addresses in one transaction; idempotent per handle.

        `require_subnet=False` (Neutron) allows a port without addresses on a network without subnets."""
        from tether.server.validation import check_endpoint_interface

        ep.handle = ep.handle or ep.id
        requested = list(ep.ips)
        check_endpoint_interface(ep)

        async def attempt() -> tuple[Endpoint, bool]:
            existing = await self.endpoint_by_handle(ep.handle or "")
            if existing is not None:
                return existing, False
            net = await self.get(Network, ep.network)
            if net is None:
                raise ApiError(400, f"network {ep.network!r} does not exist; create it with "
                                    f"`tether network create {ep.network} --subnet CIDR`")
            if require_subnet and not net.subnets:
                raise ApiError(400, f"network {net.name!r} has no subnet, so the endpoint would get no address; add "
                                    "a subnet to the network first (PUT /api/v1/networks with subnets, or "
                                    "`openstack subnet create`)")
            iface_cmp, iface_ops = await self._claim_interface(ep)
            if ep.host and await self.get(Host, ep.host) is None:
                raise ApiError(400, f"host {ep.host!r} is not registered; start `tether agent` on it first")
            ep.security_groups = await self._named_groups(ep.security_groups, net.project)
            sg_cmp, sg_ops = await self._group_writes(ep.security_groups, net.project)
            name_kv = await self.store.get(endpoint_name_key(ep))
            if name_kv is not None:
                raise ApiError(409, f"an endpoint named {ep.name!r} already exists in namespace "
                                    f"{ep.namespace!r} of network {ep.network!r}")
            try:
                alloc = await self.ipam.allocate(net, ep.host, ep.handle or ep.id, requested)
            except IpamError as e:
                raise ApiError(e.status, str(e)) from None
            ep.ips = alloc.ips
            ep.created_at = now()
            compares = [Compare(ep.key(), 0), Compare(endpoint_name_key(ep), 0), Compare(net.key(), net.revision),
                        Compare(handle_key(ep.handle or ""), 0), *alloc.compares, *iface_cmp, *sg_cmp]
            ops = [Put(ep.key(), encode(ep)), Put(endpoint_name_key(ep), ep.id.encode()),
                   Put(handle_key(ep.handle or ""), ep.id.encode()), *alloc.ops, *iface_ops, *sg_ops]
            try:
                rev = await self.store.txn(compares, ops)
            except Conflict:
                self.ipam.invalidate(net.name)
                raise
            self.ipam.committed(alloc, rev)
            ep.revision = rev
            self.note_written(ep)
            return ep, True

        return await with_retries(attempt)

    async def delete_endpoint(self, ep_id: str, fence: list[Compare] | None = None) -> Endpoint | None:
        """Delete an endpoint and release its addresses in one transaction (None if absent).
        `fence`: compares that must hold too (the GC's leadership); if one fails, `Conflict`."""

        async def attempt() -> Endpoint | None:
            for c in fence or []:
                kv = await self.store.get(c.key)
                if kv is None or kv.mod_revision != c.mod_revision:
                    raise Fenced(f"{c.key} changed: this server no longer holds it")
            try:
                ep = await self.get(Endpoint, ep_id)
            except ValidationError:  # refused by today's rules: deleted as stored, so it can be cleaned up
                found = await self.stored_as_is(Endpoint, ep_id)
                ep = found[0] if found else None
            if ep is None:
                return None
            ips = [ip for ip in (ep.ips if isinstance(ep.ips, list) else []) if isinstance(ip, str)]
            rel = await self.ipam.release(str(ep.network), ips, str(ep.handle or ep.id))
            try:
                rev = await self.remove(ep, [*rel.compares, *(fence or [])], [
                    Delete(endpoint_name_key(ep)), Delete(handle_key(ep.handle or ep.id)), *rel.ops,
                    *await self._release_interface(ep)])
            except Conflict:
                self.ipam.invalidate(ep.network)
                raise
            self.ipam.committed(rel, rev)
            return ep

        return await with_retries(attempt)

    async def change_endpoint_ips(self, ep_id: str, ips: list[str]) -> Endpoint:
        """Give an endpoint exactly `ips` (Neutron's fixed_ips update): the new addresses are taken
        and the dropped ones released in the same transaction as the endpoint, so a refused
        address (in use, outside the network) changes nothing."""
        async def attempt() -> Endpoint:
            ep = await self.must(Endpoint, ep_id)
            net = await self.get(Network, ep.network)
            if net is None:
                raise ApiError(400, f"network {ep.network!r} of endpoint {ep_id} does not exist")
            handle = ep.handle or ep.id
            added = [ip for ip in ips if ip not in ep.ips]
            removed = [ip for ip in ep.ips if ip not in ips]
            try:
                alloc = await self.ipam.allocate(net, ep.host, handle, added) if added else Allocation()
            except IpamError as e:
                raise ApiError(e.status, str(e)) from None
            rel = await self.ipam.release(net.name, removed, handle)
            blocks = dict(alloc.blocks)
            for key, b in rel.blocks.items():  # a block both gains and loses addresses: one write
                if key in blocks:
                    for ip in rel.ips:
                        if blocks[key].allocations.get(ip) == handle:
                            del blocks[key].allocations[ip]
                else:
                    blocks[key] = b
            compares = {c.key: c for c in [*rel.compares, *alloc.compares]}
            merged = Allocation(ips=list(ips), compares=list(compares.values()),
                                ops=[Put(k, encode(b)) for k, b in blocks.items()], blocks=blocks)
            data = ep.model_dump()
            data["ips"] = list(ips)
            try:
                new = Endpoint.model_validate(data)
            except ValidationError as e:
                raise ApiError(400, describe_errors(e)) from None
            try:
                obj = await self.replace(new, ep.revision, merged.compares, merged.ops)
            except Conflict:
                self.ipam.invalidate(ep.network)
                raise
            self.ipam.committed(merged, obj.revision)
            return obj

        return await with_retries(attempt)

    async def update_endpoint(self, ep_id: str, changes: dict) -> Endpoint:
        allowed = {"labels", "security_groups", "port_security", "allowed_address_pairs", "ports", "ready", "status",
                   "interface", "mac", "host", "parent", "owner", "name", "admin_state_up", "anti_spoofing",
                   "description", "tags", "display_name", "dns_name"}
        bad = set(changes) - allowed
        if bad:
            raise ApiError(400, f"cannot change {', '.join(sorted(bad))} of an endpoint; "
                                f"changeable fields: {', '.join(sorted(allowed))}")

        from tether.calc.names import endpoint_interface
        from tether.server.validation import check_owner_change

        async def attempt() -> Endpoint:
            ep = await self.must(Endpoint, ep_id)
            data = ep.model_dump()
            data.update(changes)
            try:
                new = Endpoint.model_validate(data)
            except ValidationError as e:
                raise ApiError(422, describe_errors(e)) from None
            check_owner_change(ep, new)
            want = endpoint_interface(new.owner.type, new.id, new.owner.container_id, new.owner.ifname)
            if "interface" in changes and new.interface != want and new.interface != ep.interface:
                raise ApiError(400, f"interface {new.interface!r} is refused: the server assigns the host-side device "
                                    f"name ({want!r} here) and it cannot be changed; leave interface out")
            if new.owner.type != ep.owner.type or (want and not ep.interface):
                new.interface = want  # Neutron bound (or unbound) a port: its VIF follows
            else:
                new.interface = ep.interface
            if new.host and new.host != ep.host and await self.get(Host, new.host) is None:
                raise ApiError(400, f"host {new.host!r} is not registered; start `tether agent` on it first")
            net = await self.get(Network, new.network)
            project = net.project if net is not None else None
            new.security_groups = await self._named_groups(new.security_groups, project)
            compares, ops = await self._group_writes(new.security_groups, project)
            if new.interface != ep.interface:  # Neutron bound or unbound a port: its device name follows
                iface_cmp, iface_ops = await self._claim_interface(new)
                compares += iface_cmp
                ops += [*iface_ops, *await self._release_interface(ep)]
            if new.name == ep.name:
                return await self.replace(new, ep.revision, compares, ops)
            # a rename (Docker endpoints learn their container's name after the address is taken)
            if await self.store.get(endpoint_name_key(new)) is not None:
                raise ApiError(409, f"an endpoint named {new.name!r} already exists in namespace "
                                    f"{new.namespace!r} of network {new.network!r}")
            return await self.replace(new, ep.revision, [Compare(endpoint_name_key(new), 0), *compares],
                                      [Delete(endpoint_name_key(ep)), Put(endpoint_name_key(new), new.id.encode()),
                                       *ops])

        return await with_retries(attempt)

    # --- security groups ------------------------------------------------------------------------

    async def ensure_default_group(self, project: str | None) -> SecurityGroup:
        """The project's default group, created on first use (Neutron: a project's first network,
        port or group list). Its id follows from the project, so racing callers make one group."""
        sg = default_security_group(project)
        found = await self.get(SecurityGroup, sg.id)
        if found is not None:
            return found
        try:
            return await self.create(sg)
        except Conflict:
            return await self.must(SecurityGroup, sg.id)

    async def _named_groups(self, groups: list[str], project: str | None) -> list[str]:
        """An endpoint's groups with the name `default` read as its network's project's default
        group (unless a group has the id `default`): how a container joins that group."""
        if DEFAULT_GROUP not in groups or await self.store.get(key_of("SecurityGroup", DEFAULT_GROUP)) is not None:
            return groups
        return list(dict.fromkeys(default_group_id(project) if g == DEFAULT_GROUP else g for g in groups))

    async def _group_writes(self, groups: list[str], project: str | None) -> tuple[list[Compare], list[Op]]:
        """Every group an endpoint names must exist, except its project's default group, which is
        created in the endpoint's own transaction (so a refused endpoint leaves no group behind)."""
        compares: list[Compare] = []
        ops: list[Op] = []
        default = default_security_group(project)
        for sg in groups:
            if await self.store.get(key_of("SecurityGroup", sg)) is not None:
                continue
            if sg != default.id:
                raise ApiError(400, f"security group {sg!r} does not exist; create it first or name an existing one "
                                    f"(`{DEFAULT_GROUP}` is the default group of the network's project)")
            default.created_at = now()
            compares.append(Compare(default.key(), 0))
            ops.append(Put(default.key(), encode(default)))
        return compares, ops

    async def _claim_interface(self, ep: Endpoint) -> tuple[list[Compare], list[Op]]:
        """One endpoint per host-side device: a second endpoint with another pod's container id and
        ifname would otherwise make the agent route through (and later delete) that pod's veth."""
        if not ep.interface:
            return [], []
        kv = await self.store.get(interface_key(ep.interface))
        if kv is not None and kv.value.decode() != ep.id:
            raise ApiError(409, f"device {ep.interface!r} already belongs to endpoint {kv.value.decode()!r} (same "
                                "owner container id and ifname, or port id prefix); use another owner or id")
        if kv is not None:
            return [], []
        return [Compare(interface_key(ep.interface), 0)], [Put(interface_key(ep.interface), ep.id.encode())]

    async def _release_interface(self, ep: Endpoint) -> list[Op]:
        if not ep.interface:
            return []
        kv = await self.store.get(interface_key(ep.interface))
        return [Delete(kv.key)] if kv is not None and kv.value.decode() == ep.id else []

    # --- hosts ----------------------------------------------------------------------------------

    async def register_host(self, host: Host) -> tuple[Host, bool]:
        """Create or update a host. The server assigns its VTEP address, unique across hosts through an
        index key that every attempt (CAS retries included) compares; a client cannot choose one."""
        from tether.server.validation import check_host_underlay

        asked = host.vtep_ip

        async def attempt() -> tuple[Host, bool]:
            h = host.model_copy(deep=True)  # nothing of a failed attempt leaks into the next one
            old = await self.get(Host, h.name)
            compares: list[Compare] = []
            ops: list[Op] = []
            assigned = old.vtep_ip if old is not None else None
            if asked and asked != assigned:
                raise ApiError(400, f"vtep_ip {asked} is refused: the server assigns VTEP addresses"
                                    + (f" ({assigned} is this host's)" if assigned else "") + "; leave vtep_ip out")
            if old is None or (old.underlay_ip, old.underlay_cidr) != (h.underlay_ip, h.underlay_cidr):
                # the network guard serialises this check with network writes (each checks the other's side)
                guard = await self.store.get(NETWORK_GUARD)
                compares.append(Compare(NETWORK_GUARD, guard.mod_revision if guard else 0))
                ops.append(Put(NETWORK_GUARD, b"1"))
                check_host_underlay(h, await self.list(Host), await self.list(Network))
            if assigned:
                h.vtep_ip = assigned
                kv = await self.store.get(vtep_key(assigned))
                if kv is None:  # written before the index existed, or lost: claim it again
                    compares.append(Compare(vtep_key(assigned), 0))
                    ops.append(Put(vtep_key(assigned), h.name.encode()))
                elif kv.value.decode() != h.name:
                    log.warning("host %s: its VTEP address %s is indexed to %s", h.name, assigned, kv.value.decode())
            else:
                indexed = await self.store.list(vtep_key(""))
                taken = {kv.key[len(vtep_key("")):] for kv in indexed.items}
                taken |= {o.vtep_ip for o in await self.list(Host) if o.vtep_ip}
                ip = next((str(a) for a in self.vtep_cidr.hosts() if str(a) not in taken), None)
                if ip is None:
                    raise ApiError(409, f"the VTEP range {self.vtep_cidr} is exhausted; delete hosts that are gone "
                                        "or start the server with a larger --vtep-cidr")
                h.vtep_ip = ip
                compares.append(Compare(vtep_key(ip), 0))
                ops.append(Put(vtep_key(ip), h.name.encode()))
            h.heartbeat = now()
            if old is None:
                return await self.create(h, compares, ops), True
            h.id, h.created_at = old.id, old.created_at
            return await self.replace(h, old.revision, compares, ops), False

        async with self.host_registration:
            return await with_retries(attempt)

    async def delete_host(self, name: str) -> None:
        """Delete a host without endpoints, with its VTEP index key (so the address is free again)."""

        async def attempt() -> None:
            host = await self.must(Host, name)
            eps = [e for e in await self.list(Endpoint) if e.host == name]
            if eps:
                raise ApiError(409, f"host {name!r} still has {len(eps)} endpoints; delete them first, or let the "
                                    "garbage collector reclaim them once the host's lease has expired")
            ops: list[Op] = []
            compares: list[Compare] = []
            if host.vtep_ip:
                kv = await self.store.get(vtep_key(host.vtep_ip))
                if kv is not None and kv.value.decode() == name:
                    compares.append(Compare(kv.key, kv.mod_revision))
                    ops.append(Delete(kv.key))
            await self.remove(host, compares, ops)

        await with_retries(attempt)

    async def heartbeat(self, name: str, ttl: float, applied_revision: int | None = None) -> None:
        """A host's agent is alive and has applied `applied_revision` (kept in memory). Its liveness
        lease is renewed at most every `ttl / RENEW_SHARE` by this server: agents also beat after each
        apply (so the revision they applied is seen at once), and a store write per agent per change
        was a tenth of the server's CPU in a 30-host lab; a lease renewed moments ago still has most
        of its TTL. Still checked each time: the host exists, and its lease key is there (a lease
        revoked or expired meanwhile is granted again)."""
        if await self.store.get(key_of(Host.kind, name)) is None:
            raise ApiError(404, f"host {name!r} not found")
        before = self.beats.get(name, (None, 0))[1]
        self.beats[name] = (now(), max(before, applied_revision or 0))
        key = HOST_LEASE + name
        kv = await self.store.get(key)
        clock = time.monotonic()
        renewed = self.renewed.get(name)
        if kv is not None and kv.lease and renewed is not None and renewed[0] == kv.lease \
                and clock - renewed[1] < ttl / RENEW_SHARE:
            return
        if kv is not None and kv.lease and await self.store.keepalive(kv.lease):
            self.renewed[name] = (kv.lease, clock)
            return
        lease = await self.store.grant_lease(ttl)
        await self.store.put(key, b"alive", lease=lease)
        self.renewed[name] = (lease, clock)

    def observed_host(self, h: Host) -> Host:
        """The host with what its heartbeats said: when the last one came, the revision applied."""
        beat = self.beats.get(h.name)
        if beat is None:
            return h
        status = h.status.model_copy(update={"applied_revision": max(h.status.applied_revision, beat[1])})
        return h.model_copy(update={"heartbeat": beat[0], "status": status})

    async def observed_hosts(self) -> list[Host]:
        """Every host as `observed_host` shows it: what reads the hosts' applied revisions (programming
        status, endpoint states, the CLI and the web page) takes them from here."""
        return [self.observed_host(h) for h in await self.list(Host)]

    async def observed(self, eps: list[Endpoint]) -> list[Endpoint]:
        """Endpoints with a true lifecycle state, derived on read: `pending` is `active` once its host's
        agent has applied a revision that holds the endpoint's last write and did not quarantine it."""
        if not any(e.status == "pending" and e.host for e in eps):
            return eps
        hosts = {h.name: h for h in await self.observed_hosts()}
        out = []
        for e in eps:
            h = hosts.get(e.host or "")
            # a VM port is active when its VM plugs in (the agent says so, vmports.py), not when planned
            if (e.status == "pending" and e.owner.type != "vm" and h is not None
                    and 0 < e.revision <= h.status.applied_revision
                    and not any(p.kind == "Endpoint" and p.name == e.id for p in h.status.problems)):
                e = e.model_copy(update={"status": "active"})
            out.append(e)
        return out

    async def live_hosts(self) -> set[str]:
        listed = await self.store.list(HOST_LEASE)
        return {kv.key[len(HOST_LEASE):] for kv in listed.items}

    # --- services -------------------------------------------------------------------------------

    def _service_range(self, family: str) -> IpNet:
        return self.service_cidr if family == "IPv4" else self.service_cidr6

    async def _assign_cluster_ips(self, svc: Service, old: Service | None, compares: list, ops: list) -> None:
        """One virtual IP per family of `ip_families`: the one asked for (inside that family's service
        range, not another service's), the old service's, or the first free one of the range. A
        headless service has none (its DNS name answers its backends), and gives back any it had."""
        if svc.headless:
            ops.extend(Delete(svcip_key(ip)) for ip in (old.vips() if old is not None else []))
            svc.cluster_ips, svc.cluster_ip = [], None
            return
        if svc.load_balancer:  # the VIP is the load balancer's port's address (IPAM holds it)
            if not svc.cluster_ip:
                raise ApiError(400, f"service {svc.name!r} of load balancer {svc.load_balancer} needs its VIP "
                                    "as cluster_ip")
            lb = await self.store.get(octavia_key(svc.load_balancer))
            if lb is None or json.loads(lb.value)["lb"]["vip_address"] != svc.cluster_ip:
                raise ApiError(400, f"service {svc.name!r} names load balancer {svc.load_balancer}, which does not "
                                    f"exist or whose VIP is not {svc.cluster_ip}; load balancers are made with the "
                                    "Octavia API (`openstack loadbalancer create`), not set on services")
            svc.cluster_ips = [svc.cluster_ip]
            return
        asked = {("IPv6" if ":" in ip else "IPv4"): ip for ip in [*svc.cluster_ips, *([svc.cluster_ip] if
                                                                                    svc.cluster_ip else [])]}
        kept = {("IPv6" if ":" in ip else "IPv4"): ip for ip in (old.vips() if old is not None else [])}
        chosen: list[str] = []
        taken: set[str] | None = None
        for family in svc.ip_families:
            rng = self._service_range(family)
            ip = asked.get(family) or kept.get(family)
            if ip is not None and ip != kept.get(family):
                a = ipaddress.ip_address(ip)
                if a not in rng:
                    raise ApiError(400, f"cluster IP {a} is outside the service range {rng}")
                holder = await self.store.get(svcip_key(str(a)))
                if holder is not None and holder.value.decode() != svc.store_name():
                    raise ApiError(409, f"cluster IP {a} is already used by service {holder.value.decode()}")
                ip = str(a)
                compares.append(Compare(svcip_key(ip), 0))
                ops.append(Put(svcip_key(ip), svc.store_name().encode()))
            elif ip is None:
                if taken is None:
                    taken = {v for s in await self.list(Service) for v in s.vips()}
                hosts = rng.hosts()
                next(hosts)  # .1 (::1) is conventionally the API service
                ip = next((str(a) for a in itertools.islice(hosts, 1 << 20) if str(a) not in taken), None)
                if ip is None:
                    raise ApiError(409, f"service range {rng} is exhausted")
                compares.append(Compare(svcip_key(ip), 0))
                ops.append(Put(svcip_key(ip), svc.store_name().encode()))
            chosen.append(ip)
        for ip in kept.values():
            if ip not in chosen:
                ops.append(Delete(svcip_key(ip)))
        svc.cluster_ips = chosen
        svc.cluster_ip = chosen[0]

    async def put_service(self, request: Service) -> tuple[Service, bool]:
        async def attempt() -> tuple[Service, bool]:
            # each attempt starts from the request as sent: an address chosen by a failed attempt
            # (another service won it meanwhile) is not a cluster IP the client asked for (was a 409)
            svc = request.model_copy(deep=True)
            old = await self.get(Service, svc.store_name())
            compares: list[Compare] = []
            ops: list[Op] = []
            await self._assign_cluster_ips(svc, old, compares, ops)
            await self._assign_node_ports(svc, old)
            if old is None:
                return await self.create(svc, compares, ops), True
            svc.id, svc.created_at = old.id, old.created_at
            return await self.replace(svc, old.revision, compares, ops), False

        return await with_retries(attempt)

    async def _assign_node_ports(self, svc: Service, old: Service | None) -> None:
        """NodePort services get a published port per service port (30000-32767 unless given),
        unique per protocol among services published on a common address (`Service.publishes_with`:
        Docker's -p on two hosts may share a port); an update keeps the ports it had."""
        if svc.type != "NodePort":
            if any(p.node_port for p in svc.ports):
                raise ApiError(400, f"service {svc.name!r} sets a node port but its type is {svc.type}; "
                                    "use type NodePort to publish ports on the hosts")
            return
        others = [s for s in await self.list(Service) if s.store_name() != svc.store_name() and s.publishes_with(svc)]
        taken = {(p.protocol, p.node_port) for s in others for p in s.ports if p.node_port}
        before = {(p.protocol, p.port): p.node_port for p in (old.ports if old else []) if p.node_port}
        for p in svc.ports:
            if p.node_port:
                if (p.protocol, p.node_port) in taken:
                    holder = next(s.store_name() for s in others for q in s.ports
                                  if (q.protocol, q.node_port) == (p.protocol, p.node_port))
                    where = f" on {svc.host_ip or 'host ' + svc.host}" if svc.host else ""
                    raise ApiError(409, f"node port {p.node_port}/{p.protocol} is already published{where} by "
                                        f"service {holder}; choose another or leave it empty to get a free one")
            else:
                keep = before.get((p.protocol, p.port))
                p.node_port = keep if keep and (p.protocol, keep) not in taken else next(
                    (n for n in range(30000, 32768) if (p.protocol, n) not in taken), None)
                if p.node_port is None:
                    raise ApiError(409, "node port range 30000-32767 is exhausted")
            taken.add((p.protocol, p.node_port))

    async def delete_service(self, ns: str, name: str) -> None:
        async def attempt() -> None:
            svc = await self.must(Service, f"{ns}/{name}")
            await self.remove(svc, [], [Delete(svcip_key(ip)) for ip in svc.vips()])

        await with_retries(attempt)


def check_overlap(net: Network, others: list[Network]) -> None:
    mine = [ipaddress.ip_network(s.cidr) for s in net.subnets]
    for i, a in enumerate(mine):
        for b in mine[i + 1:]:
            if a.version == b.version and a.overlaps(b):
                raise ApiError(400, f"subnets {a} and {b} of network {net.name!r} overlap; list each range once")
    for other in others:
        for s in other.subnets:
            b = ipaddress.ip_network(s.cidr)
            for a in mine:
                if a.version == b.version and a.overlaps(b):
                    raise ApiError(409, f"network {net.name!r} overlaps {other.name!r} ({a} vs {b}); "
                                        "choose another --subnet")


__all__ = ["KINDS", "ApiError", "Objects", "check_overlap"]
