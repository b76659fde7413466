"""Pure: the agent's replica -> DNS records, and a DNS query -> the answer (or "forward it").

Why a hand-written wire codec: cluster names are answered on the hot path of every pod's name
lookups, and a header + question parse with pre-encoded resource records is several times faster
than building a message object per query. Anything outside the cluster zones returns None so the
server forwards it (dns.py); dnspython is used there and in the tests.

Names (docs/ARCHITECTURE.md, "DNS"):
- `<endpoint>.<network>.<domain>`       A / AAAA (every address, shuffled per answer); also
  `<dns_name>.<network>.<domain>` for a Neutron port with a `dns_name`
- `<service>.<namespace>.svc.<domain>`  A (cluster IP); SRV for the service's ports
- `_<port>._<proto>.<service>.<namespace>.svc.<domain>`  SRV for one named port
- PTR for every endpoint and service address.
A name below a cluster zone that exists with other types (or only has names below it) answers
NODATA (NOERROR, no answers, SOA); a name that does not exist answers NXDOMAIN with the SOA.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import re
import struct
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether import yielding
from tether.calc.memos import Memos  # imports nothing heavy: the DNS worker process loads this module

if TYPE_CHECKING:  # the DNS worker process imports this module: it needs no models (or pydantic)
    from tether.calc.services import EndpointIndex
    from tether.model import Endpoint, Network, Service

A, NS, CNAME, SOA, PTR, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 28, 33, 41, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TTL = 30  # seconds, for cluster records
log = logging.getLogger("tether.agent.dns")
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.?$")


NDOTS = 5  # like Kubernetes: a name with fewer dots is tried with the search domains first


def search_path(namespace: str | None, network: str | None, domain: str) -> list[str]:
    """The search domains a pod gets: its namespace's services, every service, its network's
    endpoints, then the cluster domain; so `web` finds the service web in the pod's namespace,
    `web.other` the one in namespace other, and `pod-a` a pod on the same network."""
    d = domain.rstrip(".")
    out = ([f"{namespace}.svc.{d}"] if namespace else []) + [f"svc.{d}"]
    return out + ([f"{network}.{d}"] if network else []) + [d]


def candidates(name: str, search: list[str], ndots: int = NDOTS) -> list[str]:
    """The names a stub resolver asks, in order, for `name` (resolv.conf(5) semantics)."""
    if name.endswith("."):
        return [name]
    listed = [f"{name}.{s}." for s in search]
    return [f"{name}.", *listed] if name.count(".") >= ndots else [*listed, f"{name}."]


def _skip(skipped: set[tuple[str, str]], kind: str, name: str, why: str) -> None:
    """Leave one object out of the records (the others are still built), logged once."""
    if (kind, name) not in skipped:
        skipped.add((kind, name))
        log.warning("DNS: %s %r left out of the records: %s", kind, name[:100], why)


def _names_ok(*labels: str) -> bool:
    return all(isinstance(x, str) and LABEL.match(x) for x in labels)
NEGATIVE_TTL = 5  # SOA minimum: how long a resolver may cache "no such name"
MEMO_LIMIT = 100_000


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if label:
            b = label.encode()
            out.append(len(b))
            out += b
    out.append(0)
    return bytes(out)


def reverse_name(ip: str) -> str:
    return address_record(ip)[2]


CACHE = 1024  # entries per memo below: they speed the first records' build and the periodic cold check,
# while the records kept change by change hold what they need (65,536 entries: ~17 MB at 10,000 endpoints)


@functools.lru_cache(maxsize=CACHE)
def address_record(ip: str) -> tuple[int, bytes, str]:
    """(version, packed address, PTR owner name) of an address. Memoised: the records are rebuilt
    after every applied plan, and parsing every address again was most of that rebuild."""
    addr = ipaddress.ip_address(ip)
    return addr.version, addr.packed, addr.reverse_pointer + "."


def rr_type(rr: bytes) -> int:
    """The type of an encoded answer RR (`_rr`): the two bytes after the owner's compression pointer."""
    return rr[2] << 8 | rr[3]


def _grouped(rrs: Iterable[bytes]) -> tuple[bytes, ...]:
    """RRs grouped by type, the types in the order they first come and each type's RRs in order."""
    by: dict[int, list[bytes]] = {}
    for rr in rrs:
        by.setdefault(rr_type(rr), []).append(rr)
    return tuple(rr for group in by.values() for rr in group)


def _rr(rtype: int, ttl: int, rdata: bytes) -> bytes:
    """An answer RR whose owner is the question name (compression pointer to offset 12)."""
    return b"\xc0\x0c" + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


@dataclass
class Records:
    """Pre-encoded records by owner name (lower case, trailing dot): an owner's RRs in one tuple, grouped
    by type (the type is read from the RR, `rr_type`): a dict of lists per owner was ~0.3 KB more for
    each of the ~20,000 owners at 10,000 endpoints, in the agent and again in the DNS worker."""

    zones: tuple[str, ...] = ()  # authoritative forward zones ("tether.local.")
    reverse_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # PTR authority
    rrs: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    existing: set[str] = field(default_factory=set)  # every owner name and every name between it and its zone
    soa: dict[str, bytes] = field(default_factory=dict)  # zone -> authority-section SOA RR
    serial: int = 0
    memo: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict, compare=False)  # see respond()
    generation: int = field(default=0, compare=False)  # of the last `Delta` applied (RecordBuilder)

    def apply(self, delta: Delta) -> bool:
        """Patch the records in place with `delta`; False (nothing changed) when it was computed
        from another generation than these records': a change was lost, only a full set mends it.

        Safe while another thread answers from these records (the DNS worker): an owner's records
        are replaced whole, never changed in place; names that come to exist are added before the
        records and names that go are taken out after them; the answer memo is replaced last, and
        `respond` keeps an answer in the memo it started from, so one computed half way is dropped."""
        if delta.base is None:
            self.rrs, self.existing = dict(delta.rrs), set(delta.added)  # type: ignore[arg-type]
        elif delta.base != self.generation:
            return False
        else:
            rrs = self.rrs
            self.existing.update(delta.added)
            for owner, owned in delta.rrs.items():
                if owned is None:
                    rrs.pop(owner, None)
                else:
                    rrs[owner] = owned
            self.existing.difference_update(delta.removed)
        self.zones, self.reverse_nets, self.soa, self.serial = delta.zones, delta.reverse_nets, delta.soa, delta.serial
        self.generation = delta.generation
        self.memo = {}
        return True

    def with_parents(self, names: Iterable[str]) -> set[str]:
        """The names and every name between each and its zone: empty non-terminals exist too (they
        answer NODATA)."""
        out = set(names)
        for name in list(out):
            zone = self.zone_of(name)
            if zone is not None:
                out.update(parents(name, zone))
        return out

    def zone_of(self, name: str) -> str | None:
        """The cluster zone `name` falls in (forward or reverse), or None when it is not ours."""
        for z in self.zones:
            if name == z or name.endswith("." + z):
                return z
        if name.endswith(".in-addr.arpa.") or name.endswith(".ip6.arpa."):
            ip = ptr_address(name)
            if ip is not None and any(ip in n for n in self.reverse_nets if n.version == ip.version):
                return "in-addr.arpa." if ip.version == 4 else "ip6.arpa."
        return None


@functools.lru_cache(maxsize=CACHE)
def ptr_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    labels = name.rstrip(".").split(".")
    try:
        if name.endswith(".in-addr.arpa.") and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
        if name.endswith(".ip6.arpa.") and len(labels) == 34:
            nib = "".join(reversed(labels[:32]))
            return ipaddress.IPv6Address(":".join(nib[i:i + 4] for i in range(0, 32, 4)))
    except ValueError:
        return None
    return None


def _soa_rr(zone: str, serial: int) -> bytes:
    z = encode_name(zone)
    rdata = (encode_name("ns.dns." + zone) + encode_name("hostmaster." + zone)
             + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, NEGATIVE_TTL))
    return z + struct.pack("!HHIH", SOA, CLASS_IN, NEGATIVE_TTL, len(rdata)) + rdata


def build(endpoints: Iterable[Endpoint], services: Iterable[Service], networks: Iterable[Network],
          serial: int = 0, ttl: int = TTL, memos: Memos | None = None) -> Records:
    """All cluster records from the replica's objects, built cold (pure): the oracle the records
    kept change by change (`RecordBuilder`) must equal. `memos` only keeps the objects left out,
    so each is logged once."""
    skipped = None if memos is None else memos.dns_skipped
    return RecordBuilder(ttl, skipped).update(endpoints, services, networks, serial).records()


PartKey = tuple[str, str]  # ("e", endpoint key) or ("s", service key): the order of an owner's records


class RecordBuilder:
    """The cluster records kept up change by change (issue 29): each `update` costs work in
    proportion to the objects that changed, not to the cluster, and returns the `Delta` from the
    records of the last update (a full set the first time, and whenever the networks change).

    Kept between updates: each endpoint's and service's part of the records (`EndpointRecords`),
    which parts give each owner name its records (an owner shared by several parts lists their
    records in the order of the parts' keys: endpoints by key, then services), how many parts make
    each name exist, the endpoints by namespace and the headless services by namespace and by
    listed endpoint (a headless service's answers follow its endpoints), and the Docker containers'
    search paths. Which objects changed is found by identity against the last update's objects (they
    are replaced, never changed in place): one dict lookup per object, the only pass over the cluster."""

    def __init__(self, ttl: int = TTL, skipped: set[tuple[str, str]] | None = None) -> None:
        self.ttl = ttl
        self.skipped: set[tuple[str, str]] = set() if skipped is None else skipped  # logged once each
        self.generation = 0
        self._reset(())
        self.networks: tuple[Network, ...] | None = None  # of the last update: another set rebuilds all

    def _reset(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks
        self.all_nets = {n.name: n for n in networks}
        nets = {}
        for n in networks:
            if not _names_ok(n.name) or not DOMAIN.match(str(n.dns_domain).lower()):
                _skip(self.skipped, "Network", str(n.name),
                      f"name or dns_domain {str(n.dns_domain)[:64]!r} is not a DNS name")
                continue
            try:
                for sub in n.subnets:
                    ipaddress.ip_network(sub.cidr)
            except ValueError as e:
                _skip(self.skipped, "Network", n.name, str(e))
                continue
            nets[n.name] = n
        self.nets = nets
        self.domains = {n.dns_domain.lower().rstrip(".") + "." for n in nets.values()} or {"tether.local."}
        self.header = Records(zones=tuple(sorted(self.domains, key=len, reverse=True)),
                              reverse_nets=tuple(ipaddress.ip_network(s.cidr) for n in nets.values()
                                                 for s in n.subnets))
        self.endpoints: dict[str, Endpoint] = {}  # the last update's, by key
        self.services: dict[str, Service] = {}
        self.by_ns: dict[str, dict[str, Endpoint]] = {}  # namespace -> endpoint key -> endpoint
        self.headless_ns: dict[str, set[str]] = {}  # namespace -> keys of headless services with a selector
        self.headless_ep: dict[str, set[str]] = {}  # endpoint id -> keys of headless services listing it
        self.parts: dict[PartKey, EndpointRecords] = {}
        self.owners: dict[str, PartKey | list[PartKey]] = {}  # owner -> the part(s) giving it records
        self.counts: dict[str, int] = {}  # name -> how many parts make it exist
        self.claims: dict[str, dict[str, tuple[str, ...]]] = {}  # address -> Docker endpoint id -> its search path

    # --- one update ----------------------------------------------------------------------------------

    def update(self, endpoints: Mapping[str, Endpoint] | Iterable[Endpoint],
               services: Mapping[str, Service] | Iterable[Service], networks: Iterable[Network],
               serial: int = 0, full: bool = False, changed: Mapping[str, Collection[str]] | None = None) -> Delta:
        """The delta to these objects' records from the last update's; a full set (`base` None)
        the first time, when the networks changed (zones, reverse zones, every name's suffix) or
        when `full`. Mappings are the replica's (endpoints by id, services by `namespace/name`).
        `changed`: kind -> the keys of every object that may have changed since the last update (the
        replica's journal, `calc.planner.changes_since`), read instead of a pass over every object;
        None when nothing vouches for them."""
        nets = tuple(networks)
        rebuild = (full or self.networks is None or len(nets) != len(self.networks)
                   or any(a is not b for a, b in zip(nets, self.networks, strict=True)))
        if rebuild:
            self._reset(nets)
        eps = endpoints if isinstance(endpoints, Mapping) else {ep.id: ep for ep in endpoints}
        svcs = services if isinstance(services, Mapping) else {s.store_name(): s for s in services}
        touched: set[str] = set()  # owners whose records may have changed
        names: dict[str, bool] = {}  # name -> whether it existed before this update
        search: dict[str, tuple[str, ...] | None] = {}
        namespaces: set[str] = set()
        journal = changed is not None and not rebuild and isinstance(endpoints, Mapping) \
            and isinstance(services, Mapping)
        changed_eps = (_changed(self.endpoints, eps) if not journal else  # type: ignore[union-attr]
                       [k for k in changed.get("Endpoint", ()) if self.endpoints.get(k) is not eps.get(k)])
        for key in changed_eps:
            yielding.checkpoint()  # a full set is O(cluster): let CNI requests in
            old, ep = self.endpoints.get(key), eps.get(key)
            self._index_endpoint(key, old, ep, namespaces, search)
            self._set_part(("e", key), self._endpoint_part(ep), touched, names)
        if changed_eps:
            self.endpoints = _patched(self.endpoints, eps, changed_eps if journal else None)
        changed_svcs = set(_changed(self.services, svcs) if not journal else  # type: ignore[union-attr]
                           [k for k in changed.get("Service", ()) if self.services.get(k) is not svcs.get(k)])
        for ns in namespaces:  # headless services' answers follow the endpoints they pick
            changed_svcs.update(self.headless_ns.get(ns, ()))
        for key in changed_eps:
            changed_svcs.update(self.headless_ep.get(key, ()))
        for key in changed_svcs:
            old_svc, svc = self.services.get(key), svcs.get(key)
            if old_svc is not svc:
                self._index_service(key, old_svc, svc)
            self._set_part(("s", key), self._service_part(svc, eps), touched, names)
        if changed_svcs:
            self.services = _patched(self.services, svcs, changed_svcs if journal else None)
        zones = self.header.zones
        if not rebuild and not touched and not names and not search:  # nothing DNS shows changed
            return Delta(self.generation, self.generation, zones, self.header.reverse_nets, self.header.soa,
                         self.header.serial, {}, frozenset())
        self.generation += 1
        soa = {z: _soa_rr(z, serial) for z in (*zones, "in-addr.arpa.", "ip6.arpa.")}
        self.header.soa, self.header.serial = soa, serial
        if rebuild:
            return Delta(self.generation, None, zones, self.header.reverse_nets, soa, serial, self._all_rrs(),
                         {*self.counts, *zones}, frozenset(), self.search())
        counts = self.counts
        added = {n for n, had in names.items() if not had and n in counts}
        removed = {n for n, had in names.items() if had and n not in counts and n not in zones}
        return Delta(self.generation, self.generation - 1, zones, self.header.reverse_nets, soa, serial,
                     {owner: self._owner_rrs(owner) for owner in touched}, added, removed, search)

    def records(self) -> Records:
        """All the records as of the last update (O(cluster): for a full set to send)."""
        zones = self.header.zones
        return Records(zones=zones, reverse_nets=self.header.reverse_nets, rrs=self._all_rrs(),
                       existing={*self.counts, *zones}, soa=self.header.soa, serial=self.header.serial,
                       generation=self.generation)

    def search(self) -> dict[str, tuple[str, ...]]:
        """Every Docker container's address -> its search path (`docker_search`), as of the last update."""
        return {ip: claim[min(claim)] for ip, claim in self.claims.items()}

    # --- the parts -----------------------------------------------------------------------------------

    def _set_part(self, key: PartKey, part: EndpointRecords | None, touched: set[str], names: dict[str, bool]) -> None:
        """Replace one object's part: its owners are marked for a new look, the names it makes exist counted."""
        old = self.parts.get(key)
        if old == part:  # the same records (an object changed in what DNS does not show)
            return
        counts, owners = self.counts, self.owners
        if old is not None:
            for owner in {o for o, _t, _r in old.rrs}:
                touched.add(owner)
                ks = owners[owner]
                if isinstance(ks, list):
                    ks.remove(key)
                    if len(ks) == 1:
                        owners[owner] = ks[0]
                else:
                    del owners[owner]
            for name in self._names(old):
                names.setdefault(name, True)
                left = counts[name] - 1
                if left:
                    counts[name] = left
                else:
                    del counts[name]
            del self.parts[key]
        if part is not None:
            self.parts[key] = part
            for owner in {o for o, _t, _r in part.rrs}:
                touched.add(owner)
                ks = owners.get(owner)
                if ks is None:
                    owners[owner] = key
                elif isinstance(ks, list):
                    ks.append(key)
                    ks.sort()
                else:
                    owners[owner] = sorted((ks, key))
            for name in self._names(part):
                had = counts.get(name, 0)
                names.setdefault(name, had > 0)
                counts[name] = had + 1

    def _names(self, part: EndpointRecords) -> set[str]:
        """The names that exist because of a part: its owners and every name up to their zone."""
        return self.header.with_parents([*part.bare, *(o for o, _t, _r in part.rrs)])

    def _owner_rrs(self, owner: str) -> tuple[bytes, ...] | None:
        """An owner's records from the parts that give it some (a new tuple: records are replaced, never changed)."""
        ks = self.owners.get(owner)
        if ks is None:
            return None
        return _grouped(rr for key in (ks if isinstance(ks, list) else (ks,))
                        for o, _t, rr in self.parts[key].rrs if o == owner)

    def _all_rrs(self) -> dict[str, tuple[bytes, ...]]:
        out: dict[str, list[bytes]] = {}
        for key in sorted(self.parts):
            for owner, _rtype, rr in self.parts[key].rrs:
                out.setdefault(owner, []).append(rr)
        return {owner: (rrs[0],) if len(rrs) == 1 else _grouped(rrs) for owner, rrs in out.items()}

    def _index_endpoint(self, key: str, old: Endpoint | None, ep: Endpoint | None, namespaces: set[str],
                        search: dict[str, tuple[str, ...] | None]) -> None:
        """The endpoints by namespace and the Docker search paths, with `old` replaced by `ep`."""
        for e in (old, ep):
            if e is not None:
                namespaces.add(e.namespace)
        if old is not None:
            pool = self.by_ns.get(old.namespace, {})
            if pool.get(key) is old:
                del pool[key]
                if not pool:
                    del self.by_ns[old.namespace]
            for ip in old.ips if old.owner.type == "docker" else ():
                claim = self.claims.get(ip, {})
                if claim.pop(old.id, None) is not None:
                    if claim:
                        search[ip] = claim[min(claim)]
                    else:
                        del self.claims[ip]
                        search[ip] = None
        if ep is not None:
            self.by_ns.setdefault(ep.namespace, {})[key] = ep
            path = _docker_path(ep, self.all_nets)
            if path is not None:
                for ip in ep.ips:
                    claim = self.claims.setdefault(ip, {})
                    claim[ep.id] = path
                    search[ip] = claim[min(claim)]

    def _index_service(self, key: str, old: Service | None, svc: Service | None) -> None:
        """The headless services by namespace (with a selector) and by the endpoints they list."""
        for s, add in ((old, False), (svc, True)):
            if s is None or not s.headless:
                continue
            targets = ([(self.headless_ns, s.namespace)] if s.selector else
                       [(self.headless_ep, b.endpoint) for b in s.backends if b.endpoint])
            for index, at in targets:
                if add:
                    index.setdefault(at, set()).add(key)
                else:
                    keys = index.get(at, set())
                    keys.discard(key)
                    if not keys:
                        index.pop(at, None)

    def _service_part(self, svc: Service | None, eps: Mapping[str, Endpoint]) -> EndpointRecords | None:
        """A service's records; None when it has no name in the records."""
        if svc is None:
            return None
        if not _names_ok(svc.name, svc.namespace) or not all(_names_ok(p.name) for p in svc.ports if p.name):
            _skip(self.skipped, "Service", f"{svc.namespace}/{svc.name}",
                  "its name, namespace or a port name is not a DNS label")
            return None
        nets, ttl = self.nets, self.ttl
        svc_domains = [nets[svc.network].dns_domain.rstrip(".") + "."] if svc.network in nets else sorted(self.domains)
        try:
            for vip in svc.vips():  # A and AAAA, and the PTR of each
                address_record(vip)
            parts = []
            for d in svc_domains:
                name = f"{svc.name}.{svc.namespace}.svc.{d}"
                parts.append((name, [(struct.pack("!HHH", 0, 100, p.port) + encode_name(name), p) for p in svc.ports]))
        except (ValueError, struct.error) as e:
            _skip(self.skipped, "Service", f"{svc.namespace}/{svc.name}", str(e))
            return None
        headless = []
        if svc.headless:  # its endpoints: those of its namespace for a selector, else all by id (listed backends)
            from tether.calc.services import EndpointIndex  # not at the top: the DNS worker needs no models

            pool = (self.by_ns.get(svc.namespace, {}).values() if svc.selector
                    else EndpointIndex(by_id=eps if isinstance(eps, dict) else dict(eps)))
            headless = _headless_answers(svc, pool, ttl)
        rrs: list[tuple[str, int, bytes]] = []
        bare: list[str] = []
        for name, srvs in parts:
            if svc.vips():
                for vip in svc.vips():
                    rrs += address_rrs(name, vip, ttl)
            elif headless:  # the backends' own addresses; their PTRs stay the endpoints' names
                rrs += [(name.lower(), rtype, rr) for rtype, rr in headless]
            else:
                bare.append(name.lower())
            for srv, p in srvs:
                rrs.append((name.lower(), SRV, _rr(SRV, ttl, srv)))
                if p.name:
                    rrs.append((f"_{p.name}._{p.protocol.lower()}.{name}".lower(), SRV, _rr(SRV, ttl, srv)))
        return EndpointRecords(tuple(rrs), tuple(bare))

    def _endpoint_part(self, ep: Endpoint | None) -> EndpointRecords | None:
        """An endpoint's records; None when it has no name in the records."""
        if ep is None:
            return None
        net = self.nets.get(ep.network)
        if net is None or not ep.ips:
            return None
        if not _names_ok(ep.name):
            _skip(self.skipped, "Endpoint", ep.id, f"its name {str(ep.name)[:64]!r} is not a DNS label")
            return None
        try:
            suffix = f".{net.name}.{net.dns_domain.rstrip('.')}."
            alias = f"{ep.dns_name}{suffix}" if ep.dns_name and ep.dns_name != ep.name else None
            return endpoint_records(f"{ep.name}{suffix}", ep.ips, self.ttl, alias)
        except ValueError as e:  # an address that is not one
            _skip(self.skipped, "Endpoint", ep.id, str(e))
            return None


def _patched(last: dict[str, Any], now: Mapping[str, Any], keys: Iterable[str] | None) -> dict[str, Any]:
    """`last` made equal to `now`: patched at `keys` (all that differ), or a copy of `now` (None)."""
    if keys is None:
        return dict(now)
    for k in keys:
        if k in now:
            last[k] = now[k]
        else:
            last.pop(k, None)
    return last


def _changed(last: dict[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose object is not the last update's (added, replaced or gone): objects are
    replaced, never changed in place, so identity tells. One dict lookup per object (~1 ms for
    10,000 at C speed would need the replica to say what changed: a journal of changed keys)."""
    out = [k for k, v in now.items() if last.get(k) is not v]
    if len(now) - len(out) + sum(1 for k in out if k in last) != len(last):  # some are gone
        out += [k for k in last if k not in now]
    return out


@dataclass(frozen=True)
class Delta:
    """What changed in the records from generation `base` to `generation` (RecordBuilder): each
    changed owner's records now (None: it has none left) and the names that came to exist or went;
    the zones' header (SOA serial) comes every time. `base` None: a full set, which replaces all.
    The agent sends the DNS worker these instead of all the records after each change (pickling
    all of them was ~15 ms of the agent's CPU per change at 10,000 endpoints, bench/calc_scale.py).
    `search`: the Docker containers' search paths that changed (None: gone), or all with a full set.
    `base` == `generation`: nothing the records show changed (a policy, a host), and the serial stays."""

    generation: int
    base: int | None
    zones: tuple[str, ...]
    reverse_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    soa: dict[str, bytes]
    serial: int
    rrs: dict[str, tuple[bytes, ...] | None]
    added: frozenset[str] | set[str]
    removed: frozenset[str] | set[str] = frozenset()
    search: dict[str, tuple[str, ...] | None] = field(default_factory=dict)

    def records(self) -> Records:
        """The records of a full set (`base` None)."""
        assert self.base is None, "only a full set makes records on its own"
        rec = Records()
        rec.apply(self)
        return rec


@dataclass(frozen=True, slots=True)
class EndpointRecords:
    """One endpoint's or service's part of the records: (owner, type, encoded RR) of its names and
    addresses, and the names it makes exist without records (a service with no address). The names
    that exist because of it (its owners and the names up to their zone, `RecordBuilder._names`) are
    derived when needed, not kept: a set of them per endpoint was ~0.7 KB at 10,000 endpoints."""

    rrs: tuple[tuple[str, int, bytes], ...]
    bare: tuple[str, ...] = ()


def _headless_answers(svc: Service, endpoints: Iterable[Endpoint] | EndpointIndex, ttl: int) -> list[tuple[int, bytes]]:
    from tether.calc.services import headless_addresses

    out = []
    for ip in headless_addresses(svc, endpoints):
        try:
            version, packed, _ = address_record(ip)
        except ValueError:
            continue
        rtype = A if version == 4 else AAAA
        out.append((rtype, _rr(rtype, ttl, packed)))
    return out


def endpoint_records(name: str, ips: Iterable[str], ttl: int, alias: str | None = None) -> EndpointRecords:
    """An endpoint's part; `alias` (its Neutron
    `dns_name` in the same network) gets the same addresses, and PTRs keep naming `name`."""
    ips = list(ips)
    rrs = tuple(r for ip in ips for r in address_rrs(name, ip, ttl))
    if alias:
        rrs += tuple(r for ip in ips for r in address_rrs(alias, ip, ttl) if r[1] != PTR)
    return EndpointRecords(rrs)




@functools.lru_cache(maxsize=CACHE)
def address_rrs(name: str, ip: str, ttl: int) -> tuple[tuple[str, int, bytes], ...]:
    """(owner, type, encoded RR) of a name's A/AAAA record and of its address's PTR. Memoised like
    `address_record`: an unchanged endpoint encodes to the same bytes at every rebuild."""
    version, packed, ptr = address_record(ip)
    return ((name.lower(), A if version == 4 else AAAA, _rr(A if version == 4 else AAAA, ttl, packed)),
            (ptr, PTR, _rr(PTR, ttl, encode_name(name))))


@functools.lru_cache(maxsize=CACHE)
def parents(name: str, zone: str) -> tuple[str, ...]:
    """The names between `name` and its `zone` (the zone included)."""
    labels = name.split(".")
    out = []
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        if len(parent) < len(zone):
            break
        out.append(sys.intern(parent))  # one copy of `tether.local.` for every name below it
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, trailing dot
    qtype: int
    qclass: int
    question: bytes  # the raw question section, echoed back as sent (case preserved)


def parse_query(data: bytes) -> Query | None:
    """Header + the single question; None for anything that is not a plain standard query."""
    if len(data) < 17:
        return None
    qid, flags, qd = struct.unpack_from("!HHH", data)
    if flags & 0x8000 or (flags >> 11) & 0xF or qd != 1:
        return None
    i, labels = 12, []
    n = len(data)
    while True:
        if i >= n:
            return None
        ln = data[i]
        if ln == 0:
            i += 1
            break
        if ln & 0xC0 or i + 1 + ln > n:
            return None
        labels.append(data[i + 1:i + 1 + ln])
        i += 1 + ln
    if i + 4 > n:
        return None
    qtype, qclass = struct.unpack_from("!HH", data, i)
    try:
        name = b".".join(labels).decode("ascii").lower() + "."
    except UnicodeDecodeError:
        return None
    return Query(qid, flags, name, qtype, qclass, data[12:i + 4])


def response(q: Query, rcode: int, answers: list[bytes], authority: tuple[bytes, ...] = ()) -> bytes:
    flags = 0x8000 | 0x0400 | (q.flags & 0x0100) | 0x0080 | rcode  # QR, AA, RD copied, RA
    return (struct.pack("!HHHHHH", q.id, flags, 1, len(answers), len(authority), 0) + q.question
            + b"".join(answers) + b"".join(authority))


def error(data: bytes, rcode: int) -> bytes | None:
    """A minimal error answer (FORMERR/NOTIMP) echoing the id, when the header can be read at all."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & 0x8000:
        return None
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


def lookup(rec: Records, q: Query) -> tuple[int, list[bytes], tuple[bytes, ...]] | None:
    """(rcode, answer RRs, authority RRs) for a cluster name; None when it must be forwarded."""
    zone = rec.zone_of(q.name)
    if zone is None:
        if q.name not in rec.rrs:
            return None
        zone = "ip6.arpa." if q.name.endswith(".ip6.arpa.") else "in-addr.arpa."  # a service address
    if q.qclass != CLASS_IN:
        return REFUSED, [], ()
    rrs = rec.rrs.get(q.name)
    if rrs is not None:
        found = list(rrs) if q.qtype == ANY else [rr for rr in rrs if rr_type(rr) == q.qtype]
        if found:
            return NOERROR, found, ()
    soa = (rec.soa[zone],)
    if q.name in rec.existing:
        return NOERROR, [], soa  # NODATA
    return NXDOMAIN, [], soa


def _resolve(rec: Records, data: bytes) -> tuple[Query, int, list[bytes], tuple[bytes, ...]] | bytes | None:
    """(query, rcode, answers, authority) for a cluster name; an error reply for a malformed
    query; None when the query must be forwarded upstream."""
    q = parse_query(data)
    if q is None:
        return error(data, FORMERR)
    found = lookup(rec, q)
    if found is None:
        return None
    return (q, *found)


def _shuffled(q: Query, answers: list[bytes]) -> bool:
    return len(answers) > 1 and q.qtype in (A, AAAA, ANY)


def answer(rec: Records, data: bytes) -> bytes | None:
    """The answer for a cluster name, or None when the query must be forwarded upstream."""
    found = _resolve(rec, data)
    if found is None or isinstance(found, bytes):
        return found
    q, rcode, answers, authority = found
    if _shuffled(q, answers):
        answers = random.sample(answers, len(answers))
    return response(q, rcode, answers, authority)


def _docker_path(ep: Endpoint, networks: dict[str, Network]) -> tuple[str, ...] | None:
    """A Docker container's search path (`docker_search`), None for any other endpoint."""
    net = networks.get(ep.network)
    if ep.owner.type != "docker" or net is None:
        return None
    return tuple(search_path(ep.namespace, ep.network, str(net.dns_domain)))


def docker_search(endpoints: Iterable[Endpoint], networks: dict[str, Network]) -> dict[str, tuple[str, ...]]:
    """Address of a Docker container -> its search path. Docker's embedded resolver (127.0.0.11)
    answers its own host's containers and forwards every other name, unchanged and from the
    container's address, to the daemon's `dns` server: a bare `web` reaches us without a search
    domain, so we apply the asker's search path for it. An address two containers claim takes the
    path of the one with the smaller id (as `RecordBuilder.search`, whatever the order of the objects)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for ep in endpoints:
        path = _docker_path(ep, networks)
        if path is not None:
            for ip in ep.ips:
                if ip not in out or ep.id < out[ip][0]:
                    out[ip] = (ep.id, path)
    return {ip: path for ip, (_id, path) in out.items()}


def answer_bare(rec: Records, data: bytes, search: tuple[str, ...] | None) -> bytes | None:
    """The answer for a single-label name (`web.`) through the asker's search path, owned by the name
    asked; None when it is not such a query or no search domain holds the name."""
    if not search:
        return None
    q = parse_query(data)
    if q is None or q.name.count(".") != 1 or q.qclass != CLASS_IN:
        return None
    for domain in search:
        rrs = rec.rrs.get(f"{q.name}{domain.rstrip('.')}.")
        found = [rr for rr in rrs if rr_type(rr) == q.qtype] if rrs else None
        if found:
            return response(q, NOERROR, random.sample(found, len(found)) if len(found) > 1 else found)
    return None


SHUFFLES = 24  # distinct orders kept per multi-address name


def respond(rec: Records, data: bytes) -> bytes | None:
    """`answer`, memoised on the query bytes after the id: the hot path is one dict lookup.

    A name with several addresses keeps up to SHUFFLES orders and serves one at random, so answers
    stay shuffled. The memo lives on the Records object, so new records start with an empty one, and
    a patch (`Records.apply`) replaces it: an answer is kept in the memo it was looked up in, so one
    computed while another thread patched the records goes with the old memo."""
    memo = rec.memo
    tails = memo.get(data[2:])
    if tails is not None:
        return data[:2] + (tails[0] if len(tails) == 1 else random.choice(tails))
    found = _resolve(rec, data)
    if found is None or isinstance(found, bytes):
        return found
    q, rcode, answers, authority = found
    if _shuffled(q, answers):
        orders = {tuple(random.sample(answers, len(answers))) for _ in range(SHUFFLES * 2)}
        tails = tuple(response(q, rcode, list(o), authority)[2:] for o in list(orders)[:SHUFFLES])
    else:
        tails = (response(q, rcode, answers, authority)[2:],)
    if len(memo) < MEMO_LIMIT:
        memo[data[2:]] = tails
    return data[:2] + random.choice(tails)
