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

import collections
import functools
import ipaddress
import logging
import random
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether import yielding
from tether.calc.memos import Memos  # imports nothing heavy: the DNS worker process loads this module

if TYPE_CHECKING:  # the DNS worker process imports this module: it needs no models (or pydantic)
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


@functools.lru_cache(maxsize=1 << 16)
def address_record(ip: str) -> tuple[int, bytes, str]:
    """(version, packed address, PTR owner name) of an address. Memoised: the records are rebuilt
    after every applied plan, and parsing every address again was most of that rebuild."""
    addr = ipaddress.ip_address(ip)
    return addr.version, addr.packed, addr.reverse_pointer + "."


def _rr(rtype: int, ttl: int, rdata: bytes) -> bytes:
    """An answer RR whose owner is the question name (compression pointer to offset 12)."""
    return b"\xc0\x0c" + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


@dataclass
class Records:
    """Pre-encoded records by owner name (lower case, trailing dot) and type."""

    zones: tuple[str, ...] = ()  # authoritative forward zones ("tether.local.")
    reverse_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # PTR authority
    rrs: dict[str, dict[int, list[bytes]]] = field(default_factory=dict)
    existing: set[str] = field(default_factory=set)  # every owner name and every name between it and its zone
    soa: dict[str, bytes] = field(default_factory=dict)  # zone -> authority-section SOA RR
    serial: int = 0
    memo: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)  # see respond()

    def add(self, name: str, rtype: int, rdata: bytes, ttl: int = TTL) -> None:
        self.add_rr(name.lower(), rtype, _rr(rtype, ttl, rdata))

    def add_rr(self, owner: str, rtype: int, rr: bytes) -> None:
        """An encoded RR (`_rr`) under a lower-case owner name."""
        self.rrs.setdefault(owner, {}).setdefault(rtype, []).append(rr)
        self.existing.add(owner)

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


@functools.lru_cache(maxsize=1 << 16)
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
    """All cluster records from the replica's objects (pure). Rebuilt for every change, so what an
    endpoint contributes is kept from one build to the next (`memos.dns_endpoints`)."""
    m = Memos() if memos is None else memos
    nets = {}
    for n in networks:
        if not _names_ok(n.name) or not DOMAIN.match(str(n.dns_domain).lower()):
            _skip(m.dns_skipped, "Network", str(n.name),
                  f"name or dns_domain {str(n.dns_domain)[:64]!r} is not a DNS name")
            continue
        try:
            for sub in n.subnets:
                ipaddress.ip_network(sub.cidr)
        except ValueError as e:
            _skip(m.dns_skipped, "Network", n.name, str(e))
            continue
        nets[n.name] = n
    domains = {n.dns_domain.lower().rstrip(".") + "." for n in nets.values()} or {"tether.local."}
    rec = Records(zones=tuple(sorted(domains, key=len, reverse=True)), serial=serial)
    rec.reverse_nets = tuple(ipaddress.ip_network(s.cidr) for n in nets.values() for s in n.subnets)
    for z in rec.zones:
        rec.soa[z] = _soa_rr(z, serial)
    rec.soa["in-addr.arpa."] = _soa_rr("in-addr.arpa.", serial)
    rec.soa["ip6.arpa."] = _soa_rr("ip6.arpa.", serial)

    services = list(services)  # read twice: by headless services' answers, then for the services' own names
    endpoints = list(endpoints)  # read twice: by headless services, then for the endpoints' own names
    context = (rec.zones, rec.reverse_nets, ttl, tuple(nets.values()))  # what a part depends on besides its object
    # the last build's records, with only the parts of the services and endpoints that changed taken
    # out and put in (not with a headless service: its answers follow endpoints)
    last = m.dns_last
    if last is not None and _same(last[0], context) and not any(svc.headless for svc in services):
        patched = _patch(rec, last, services, endpoints, nets, domains, ttl, m)
        if patched is not None:
            return patched
    smemo = m.dns_services if last is not None and _same(last[0], context) else {}
    memo = m.dns_endpoints[1] if m.dns_endpoints[0] == context[:3] else {}
    counts: collections.Counter[str] = collections.Counter()
    kept_svcs: dict[tuple[str, str], tuple] = {}
    for svc in services:
        part = _service_part(rec, svc, nets, domains, endpoints, smemo, ttl, m)
        if part is None:
            continue
        kept_svcs[(svc.namespace, svc.name)] = part
        for owner, rtype, rr in part[1].rrs:
            rec.add_rr(owner, rtype, rr)
        counts.update(part[1].names)
    kept: dict[str, tuple[Endpoint, Network, EndpointRecords]] = {}
    for ep in endpoints:
        yielding.checkpoint()
        hit = _endpoint_part(rec, ep, nets, memo, ttl, m)
        if hit is None:
            continue
        kept[ep.id] = hit
        for owner, rtype, rr in hit[2].rrs:
            rec.add_rr(owner, rtype, rr)
        counts.update(hit[2].names)
    rec.existing = set(counts)
    m.dns_endpoints = (context[:3], kept)
    m.dns_services = kept_svcs
    rec.existing.update(rec.zones)
    m.dns_last = (context, rec, counts)
    return rec


def _service_part(rec: Records, svc: Service, nets: dict[str, Network], domains: set[str],
                  endpoints: list[Endpoint], memo: dict[tuple[str, str], tuple], ttl: int, m: Memos
                  ) -> tuple[Service, EndpointRecords] | None:
    """A service's (service, its records), from `memo` when it is the same object (and not headless:
    its answers follow the endpoints); None when it has no name in the records."""
    hit = memo.get((svc.namespace, svc.name))
    if hit is not None and hit[0] is svc and not svc.headless:
        return hit
    if not _names_ok(svc.name, svc.namespace) or not all(_names_ok(p.name) for p in svc.ports if p.name):
        _skip(m.dns_skipped, "Service", f"{svc.namespace}/{svc.name}",
              "its name, namespace or a port name is not a DNS label")
        return None
    svc_domains = [nets[svc.network].dns_domain.rstrip(".") + "."] if svc.network in nets else sorted(domains)
    try:
        for vip in svc.vips():  # A and AAAA, and the PTR of each
            address_record(vip)
        parts = []
        for d in svc_domains:
            name = f"{svc.name}.{svc.namespace}.svc.{d}"
            parts.append((name, [(struct.pack("!HHH", 0, 100, p.port) + encode_name(name), p) for p in svc.ports]))
    except (ValueError, struct.error) as e:
        _skip(m.dns_skipped, "Service", f"{svc.namespace}/{svc.name}", str(e))
        return None
    headless = _headless_answers(svc, endpoints, ttl) if svc.headless else []
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
    return svc, EndpointRecords(tuple(rrs), frozenset(rec.with_parents([*bare, *(o for o, _t, _r in rrs)])))


def _endpoint_part(rec: Records, ep: Endpoint, nets: dict[str, Network], memo: dict[str, Any], ttl: int,
                   m: Memos) -> tuple[Endpoint, Network, EndpointRecords] | None:
    """An endpoint's (endpoint, network, its records), from `memo` when neither changed; None when
    it has no name in the records."""
    net = nets.get(ep.network)
    if net is None or not ep.ips:
        return None
    hit = memo.get(ep.id)
    if hit is None or hit[0] is not ep or hit[1] is not net:  # objects are replaced, never changed
        if not _names_ok(ep.name):
            _skip(m.dns_skipped, "Endpoint", ep.id, f"its name {str(ep.name)[:64]!r} is not a DNS label")
            return None
        try:
            suffix = f".{net.name}.{net.dns_domain.rstrip('.')}."
            alias = f"{ep.dns_name}{suffix}" if ep.dns_name and ep.dns_name != ep.name else None
            hit = (ep, net, endpoint_records(rec, f"{ep.name}{suffix}", ep.ips, ttl, alias))
        except ValueError as e:  # an address that is not one
            _skip(m.dns_skipped, "Endpoint", ep.id, str(e))
            return None
    return hit


def _same(a: tuple, b: tuple) -> bool:
    """Whether two builds' contexts are equal: zones, reverse networks, TTL and the same network
    objects (replaced, never changed in place)."""
    return a[:3] == b[:3] and len(a[3]) == len(b[3]) and all(x is y for x, y in zip(a[3], b[3], strict=True))


def _patch(rec: Records, last: tuple, services: list[Service], endpoints: list[Endpoint], nets: dict[str, Network],
           domains: set[str], ttl: int, m: Memos) -> Records | None:
    """The last build's records with only the changed services' and endpoints' parts replaced
    (`rec` holds this build's header); None when that could order an owner's records differently
    from a full build (an owner shared by two parts), then the caller builds them all. The last
    records are not changed (the DNS server answers from them): owners touched are copied first.
    Building all was ~40 ms of CPU with 10,000 endpoints and ~250 ms after a service change
    (bench/calc_scale.py); this is a lookup per object and the changed parts."""
    _context, before, counts = last
    m.dns_last = None  # `counts` changes in place: if this stops half way, the next build is a full one
    gone: list[EndpointRecords] = []
    new: list[EndpointRecords] = []
    smemo = m.dns_services
    kept_svcs: dict[tuple[str, str], tuple] = {}
    for svc in services:
        key = (svc.namespace, svc.name)
        hit = smemo.get(key)
        if hit is not None and hit[0] is svc:
            kept_svcs[key] = hit
            continue
        hit = _service_part(rec, svc, nets, domains, endpoints, smemo, ttl, m)
        if hit is not None:
            kept_svcs[key] = hit
            new.append(hit[1])
    if len(kept_svcs) - len(new) != len(smemo):  # some changed or were deleted
        gone += [hit[1] for key, hit in smemo.items() if kept_svcs.get(key) is not hit]
    memo = m.dns_endpoints[1]
    kept: dict[str, tuple[Endpoint, Network, EndpointRecords]] = {}
    fresh = 0
    for ep in endpoints:
        hit = memo.get(ep.id)
        if hit is not None and hit[0] is ep and hit[1] is nets.get(ep.network):
            kept[ep.id] = hit
            continue
        hit = _endpoint_part(rec, ep, nets, memo, ttl, m)
        if hit is not None:
            kept[ep.id] = hit
            new.append(hit[2])
            fresh += 1
    if len(kept) - fresh != len(memo):  # some changed or were deleted
        gone += [hit[2] for ep_id, hit in memo.items() if kept.get(ep_id) is not hit]
    rrs = dict(before.rrs)
    copied: set[str] = set()

    def owned(owner: str) -> dict[int, list[bytes]]:
        if owner not in copied:
            copied.add(owner)
            rrs[owner] = {t: list(v) for t, v in rrs.get(owner, {}).items()}
        return rrs[owner]

    for part in gone:
        for owner, rtype, rr in part.rrs:
            lists = owned(owner)
            lists[rtype].remove(rr)
        for owner in {o for o, _t, _r in part.rrs}:
            if any(rrs[owner].values()):
                return None  # another part's records stay: a full build orders them
            del rrs[owner]
            copied.discard(owner)
        counts.subtract(part.names)
    for part in new:
        owners = {o for o, _t, _r in part.rrs}
        if any(o in rrs for o in owners):
            return None
        for owner, rtype, rr in part.rrs:
            owned(owner).setdefault(rtype, []).append(rr)
        counts.update(part.names)
    existing = set(before.existing)
    for part in gone:
        for name in part.names:
            if counts[name] <= 0:
                del counts[name]
                if name not in rec.zones:
                    existing.discard(name)
    for part in new:
        existing.update(part.names)
    out = Records(zones=rec.zones, reverse_nets=rec.reverse_nets, rrs=rrs, existing=existing, soa=rec.soa,
                  serial=rec.serial)
    m.dns_endpoints = (m.dns_endpoints[0], kept)
    m.dns_services = kept_svcs
    m.dns_last = (_context, out, counts)
    return out


@dataclass(frozen=True, slots=True)
class EndpointRecords:
    """One endpoint's part of the records: (owner, type, encoded RR) of its names and addresses, and
    the names that exist because of it (owners and the empty non-terminals up to their zone)."""

    rrs: tuple[tuple[str, int, bytes], ...]
    names: frozenset[str]


def _headless_answers(svc: Service, endpoints: list[Endpoint], ttl: int) -> list[tuple[int, bytes]]:
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


def endpoint_records(rec: Records, name: str, ips: Iterable[str], ttl: int, alias: str | None = None
                     ) -> EndpointRecords:
    """An endpoint's part, for the zones and reverse networks of `rec`; `alias` (its Neutron
    `dns_name` in the same network) gets the same addresses, and PTRs keep naming `name`."""
    ips = list(ips)
    rrs = tuple(r for ip in ips for r in address_rrs(name, ip, ttl))
    if alias:
        rrs += tuple(r for ip in ips for r in address_rrs(alias, ip, ttl) if r[1] != PTR)
    return EndpointRecords(rrs, frozenset(rec.with_parents(owner for owner, _rtype, _rr in rrs)))




@functools.lru_cache(maxsize=1 << 16)
def address_rrs(name: str, ip: str, ttl: int) -> tuple[tuple[str, int, bytes], ...]:
    """(owner, type, encoded RR) of a name's A/AAAA record and of its address's PTR. Memoised like
    `address_record`: an unchanged endpoint encodes to the same bytes at every rebuild."""
    version, packed, ptr = address_record(ip)
    return ((name.lower(), A if version == 4 else AAAA, _rr(A if version == 4 else AAAA, ttl, packed)),
            (ptr, PTR, _rr(PTR, ttl, encode_name(name))))


@functools.lru_cache(maxsize=1 << 16)
def parents(name: str, zone: str) -> tuple[str, ...]:
    """The names between `name` and its `zone` (the zone included)."""
    labels = name.split(".")
    out = []
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        if len(parent) < len(zone):
            break
        out.append(parent)
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
    types = rec.rrs.get(q.name)
    if types is not None:
        found = [rr for rrs in types.values() for rr in rrs] if q.qtype == ANY else types.get(q.qtype, [])
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


def docker_search(endpoints: Iterable[Endpoint], networks: dict[str, Network]) -> dict[str, tuple[str, ...]]:
    """Address of a Docker container -> its search path. Docker's embedded resolver (127.0.0.11)
    answers its own host's containers and forwards every other name, unchanged and from the
    container's address, to the daemon's `dns` server: a bare `web` reaches us without a search
    domain, so we apply the asker's search path for it."""
    out: dict[str, tuple[str, ...]] = {}
    for ep in endpoints:
        net = networks.get(ep.network)
        if ep.owner.type == "docker" and net is not None:
            path = tuple(search_path(ep.namespace, ep.network, str(net.dns_domain)))
            for ip in ep.ips:
                out[ip] = path
    return out


def answer_bare(rec: Records, data: bytes, search: tuple[str, ...] | None) -> bytes | None:
    """The answer for a single-label name (`web.`) through the asker's search path, owned by the name
    asked; None when it is not such a query or no search domain holds the name."""
    if not search:
        return None
    q = parse_query(data)
    if q is None or q.name.count(".") != 1 or q.qclass != CLASS_IN:
        return None
    for domain in search:
        types = rec.rrs.get(f"{q.name}{domain.rstrip('.')}.")
        found = types.get(q.qtype) if types else None
        if found:
            return response(q, NOERROR, random.sample(found, len(found)) if len(found) > 1 else found)
    return None


SHUFFLES = 24  # distinct orders kept per multi-address name


def respond(rec: Records, data: bytes) -> bytes | None:
    """`answer`, memoised on the query bytes after the id: the hot path is one dict lookup.

    A name with several addresses keeps up to SHUFFLES orders and serves one at random, so answers
    stay shuffled. The memo lives on the Records object, so new records start with an empty one."""
    tails = rec.memo.get(data[2:])
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
    if len(rec.memo) < MEMO_LIMIT:
        rec.memo[data[2:]] = tails
    return data[:2] + random.choice(tails)
