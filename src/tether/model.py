"""The objects of Tether's desired state, shared by server, agent and CLI (docs/ARCHITECTURE.md: keys, API).

Every object is a pydantic model with `extra="forbid"`, so an unknown field is an error that names
the field. Objects are stored as JSON under `key_of(obj)`; the server fills `id`, `created_at` and
`revision` (the store revision of the object's last write).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tether.calc import names

PREFIX = "/tether/v1/"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # uuid-like or a DNS label: never '/', ':' or whitespace
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")  # plus: a letter, and no "--" (RFC 6335)
PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")  # no NUL, newline or other control characters

# Size caps (issue 22): what one object may hold, close to Neutron's and Kubernetes' own limits, so no
# write can make every agent compile (or every watcher receive) something unbounded.
MAX_ID = 128  # ids and references to ids (uuid: 36; Docker ids: 64)
MAX_TEXT = 255  # descriptions and free-text names, as Neutron's
MAX_CONTAINER_ID = 256  # CNI container ids (the spec does not bound them; runtimes use 64)
MAX_HANDLE = 512  # IPAM handles: "<container id>/<ifname>" and friends
MAX_LABELS = 64  # labels (and selector terms) per object
MAX_SUBNETS = 16  # subnets per network
MAX_ENDPOINT_IPS = 10  # fixed addresses per endpoint
MAX_ADDRESS_PAIRS = 10  # Neutron's max_allowed_address_pair
MAX_SECURITY_GROUPS = 32  # security groups per endpoint
MAX_PORT_DECLS = 64  # declared container ports per endpoint
MAX_RULES = 512  # rules per security group
MAX_SERVICE_PORTS = 64  # ports per service
MAX_BACKENDS = 1000  # explicit backends per service (an EndpointSlice holds at most 1000)
MAX_POOLS = 64  # allocation pools per subnet
MAX_TAGS = 64  # Neutron tags per object
MAX_TAG = 60  # characters per tag (Neutron's MAX_TAG_LEN)
MAX_DNS_SERVERS = 5  # Neutron's max_dns_nameservers
MAX_HOST_ROUTES = 20  # Neutron's max_subnet_host_routes
# The longest name the agent's DNS serves is `_<port>._<proto>.<service>.<namespace>.svc.<domain>`:
# 17 + 5 + 64 + 64 + 4 characters before the domain, and a DNS name has at most 253.
MAX_DNS_DOMAIN = 253 - (17 + 5 + 64 + 64 + 4)
VNI = 4096  # one VTEP per host carries every network with this VNI

Encapsulation = Literal["vxlan", "direct", "auto"]


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def check_dns_label(value: str, what: str = "name") -> str:
    if not DNS_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS label: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
    for k, v in labels.items():
        if not LABEL_KEY.match(k):
            raise ValueError(f"label key {k!r} is invalid: use [prefix/]name with letters, digits, '-', '_', '.'")
        if not LABEL_VALUE.match(v):
            raise ValueError(f"label value {v!r} for {k!r} is invalid: at most 63 letters, digits, '-', '_', '.'")
    return labels


def check_id(value: str, what: str = "id") -> str:
    """Ids end up in store keys, chain and set names: uuid-like or a DNS label, nothing path-like."""
    if len(value) > MAX_ID or not SAFE_ID.match(value) or ".." in value:
        raise ValueError(f"{what} {value[:80]!r} is not a valid id: use at most {MAX_ID} letters, digits, '-', '_' "
                         "and '.', starting with a letter or digit (a uuid is best); no '/', '..' or spaces")
    return value


def check_text(value: str, what: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise ValueError(f"{what} has {len(value)} characters; at most {limit} are allowed")
    if not PRINTABLE.match(value):
        raise ValueError(f"{what} holds a control character (NUL, newline, tab...); remove it")
    return value


def check_token(value: str, what: str, limit: int) -> str:
    """A printable string without whitespace (container ids, handles)."""
    check_text(value, what, limit)
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value[:80]!r} must be non-empty and hold no whitespace")
    return value


def check_ip(value: str, what: str = "address") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{what} {value[:80]!r} is not an IP address; write it like 10.1.0.5 or fd00::5") from None


def check_ip_or_cidr(value: str, what: str = "address") -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{what} {value[:80]!r} is not an IP address or CIDR; write it like 10.1.0.5 or "
                         "10.1.0.0/24") from None
    return value


def check_mac(value: str, what: str = "mac") -> str:
    """A unicast Ethernet address: the kernel refuses a multicast or all-zero MAC on a device."""
    mac = value.lower().replace("-", ":")
    if not MAC.match(mac):
        raise ValueError(f"{what} {value[:80]!r} is not a MAC address; write it like 02:00:00:00:00:01")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ValueError(f"{what} {value} is a multicast or zero MAC; use a unicast one (first byte even), "
                         "or leave it out to get one")
    return mac


def check_dns_domain(value: str) -> str:
    """A DNS name of labels (letters, digits, '-'), short enough for every name the agent derives from it."""
    name = value.lower().rstrip(".")
    if not name or len(name) > MAX_DNS_DOMAIN:
        raise ValueError(f"dns_domain {value[:80]!r} must have 1-{MAX_DNS_DOMAIN} characters (the agent's longest "
                         "service names add 154 to it, and DNS allows 253)")
    for label in name.split("."):
        if not DNS_LABEL.match(label):
            raise ValueError(f"dns_domain {value[:80]!r} is not a DNS name: use dot-separated labels of 1-63 "
                             "letters, digits and '-', like cluster.local")
    return name


def check_tags(tags: list[str]) -> list[str]:
    """Neutron tags: free text without commas (the CLI and `?tags=` filters join them with commas)."""
    check_unique_count(tags, "tags", MAX_TAGS)
    for t in tags:
        check_text(t, "tag", MAX_TAG)
        if not t or "," in t:
            raise ValueError(f"tag {t!r} must be non-empty and hold no comma")
    return list(dict.fromkeys(tags))


def check_unique_count(values: list, what: str, limit: int) -> None:
    if len(values) > limit:
        raise ValueError(f"{len(values)} {what}; at most {limit} are allowed")


def at_most(limit: int, what: str) -> AfterValidator:
    """A list field's size limit as an annotation (`Annotated[list[X], at_most(MAX_X, "xs")]`)."""
    def check(v: list) -> list:
        check_unique_count(v, what, limit)
        return v
    return AfterValidator(check)


def check_named(v: str, problem: str, what: str) -> str:
    """`v`, or ValueError with why `tether.calc.names.<problem>` refuses it (a device name, a netns path)."""
    why = getattr(names, problem)(v)
    if why:
        raise ValueError(f"{what} {v[:80]!r} {why}")
    return v


def checked(check: Callable[..., str], *args: Any) -> AfterValidator:
    """A field's check as an annotation (`Annotated[str, checked(check_ip, "cluster_ip")]`): one
    line on the field instead of a validator method per field."""
    return AfterValidator(lambda v: check(v, *args))


# references to other objects by name, checked as those objects' names are
NamespaceName = Annotated[str, checked(check_dns_label, "namespace")]
NetworkName = Annotated[str, checked(check_dns_label, "network name")]
HostName = Annotated[str, checked(check_dns_label, "host name")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Obj(Strict):
    """Fields every stored object has."""

    kind: ClassVar[str]
    namespaced: ClassVar[bool] = False

    id: Annotated[str, checked(check_id)] = Field(default_factory=new_id)
    name: Annotated[str, checked(check_text, "name")]
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=now)
    revision: int = 0

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    def key(self) -> str:
        return key_of(self.kind, self.store_name())

    def store_name(self) -> str:
        """The part of the key after the kind: the name, or `namespace/name`, or the id."""
        return self.name


# --- cluster objects ---------------------------------------------------------------------------


class Problem(Strict):
    """Something a host's agent could not apply: an object it quarantined (`kind`/`name` say which)
    or a kernel operation that failed (`kind` "operation")."""

    kind: str = Field(max_length=64)
    name: str = Field(max_length=256)
    reason: str = Field(max_length=1024)
    since: datetime = Field(default_factory=now)


class HostStatus(Strict):
    """What a host's agent reports back about its last apply (written only by the agent, through
    PUT /api/v1/hosts/{name}/status, and only when it changes)."""

    problems: list[Problem] = Field(default_factory=list, max_length=500)  # quarantined objects
    failed_ops: list[Problem] = Field(default_factory=list, max_length=200)  # failed kernel operations
    applied_revision: int = 0  # the replica revision of the last plan applied
    updated_at: datetime | None = None


class Host(Obj):
    kind: ClassVar[str] = "Host"
    name: Annotated[str, checked(check_dns_label, "host name")]
    underlay_ip: str
    underlay_cidr: str | None = None  # the underlay subnet, for `auto` (direct inside it, vxlan across)
    vtep_mac: Annotated[str, checked(check_mac, "vtep_mac")] | None = None
    vtep_ip: str | None = None  # the VXLAN device address (link-local style, unique per host)
    # an IPv6 address of the host on the underlay (the agent reports its underlay device's
    # link-local one): the next hop of IPv6 pod routes in `direct` mode
    underlay_ip6: str | None = None
    dns_ip: str | None = None  # where the host's agent answers DNS for its pods
    agent_version: Annotated[str, checked(check_text, "agent_version", 64)] | None = None
    heartbeat: datetime | None = None
    lease_id: int | None = None
    status: HostStatus = Field(default_factory=HostStatus)  # reported by the host's agent


    @field_validator("underlay_ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        # IPv4 or IPv6: the VTEP, FDB entries, direct routes and VXLAN rules follow its family; two hosts
        # of different families have no path between them (calc.host.route_to, reported by path health)
        return check_ip(v, "underlay_ip")

    @field_validator("underlay_ip6")
    @classmethod
    def _ip6(cls, v: str | None) -> str | None:
        if v is None:
            return None
        ip = check_ip(v, "underlay_ip6")
        if ipaddress.ip_address(ip).version != 6:
            raise ValueError(f"underlay_ip6 {ip} is not an IPv6 address; give the host's IPv6 underlay (or "
                             "link-local) address, or leave it out")
        return ip

    @field_validator("vtep_ip", "dns_ip")
    @classmethod
    def _addresses(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else check_ip(v, info.field_name or "address")

    @model_validator(mode="after")
    def _underlay(self) -> Host:
        if self.underlay_cidr is not None:
            self.underlay_cidr = _underlay_subnet(self.underlay_cidr, self.underlay_ip)
        return self


@functools.lru_cache(maxsize=4096)
def _underlay_subnet(cidr: str, underlay_ip: str) -> str:
    """The underlay CIDR normalised, checked to hold the host's address. Memoised: every agent parses
    every Host event (a status report, a heartbeat), the same few values each time."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ValueError(f"underlay_cidr {cidr[:80]!r} is not a CIDR; write it like 192.168.1.0/24") from None
    if ipaddress.ip_address(underlay_ip) not in net:
        raise ValueError(f"underlay_cidr {net} does not contain underlay_ip {underlay_ip}; give the "
                         "subnet of the underlay interface")
    return str(net)


class HostRoute(Strict):
    """A route handed to the subnet's VMs by DHCP (Neutron's `host_routes`)."""

    destination: str
    nexthop: Annotated[str, checked(check_ip, "nexthop")]

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"host route destination {v!r} is not a CIDR ({e}); write it like 10.9.0.0/16") from None


class Subnet(Strict):
    cidr: str
    gateway: str | None = None  # informational for routed endpoints; Neutron and Docker expose it
    pools: list[str] = Field(default_factory=list)  # allocation ranges "a.b.c.d-a.b.c.e"; empty = whole CIDR
    id: Annotated[str, checked(check_id, "subnet id")] = Field(default_factory=new_id)
    name: Annotated[str, checked(check_text, "subnet name")] | None = None
    # Neutron's ipv6_address_mode: Tether assigns every address itself (IPAM, handed over by CNI or
    # the port), which is `dhcpv6-stateful`; SLAAC modes are refused (no router advertisements)
    ipv6_address_mode: Literal["dhcpv6-stateful"] | None = None
    description: Annotated[str, checked(check_text, "description")] = ""
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)
    # what DHCP hands the subnet's VMs (stored and shown; Tether's pods get DNS from their agent)
    enable_dhcp: bool = True
    dns_nameservers: list[Annotated[str, checked(check_ip, "dns_nameservers")]] = Field(default_factory=list)
    host_routes: Annotated[list[HostRoute], at_most(MAX_HOST_ROUTES, "host_routes")] = Field(default_factory=list)

    @field_validator("dns_nameservers")
    @classmethod
    def _dns(cls, v: list[str]) -> list[str]:
        check_unique_count(v, "dns_nameservers", MAX_DNS_SERVERS)
        if len(set(v)) != len(v):
            raise ValueError("dns_nameservers lists an address twice; list each once")
        return v


    @field_validator("pools")
    @classmethod
    def _pools(cls, v: list[str]) -> list[str]:
        check_unique_count(v, "allocation pools", MAX_POOLS)
        for p in v:
            check_text(p, "pool", 100)
        return v

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError as e:
            raise ValueError(f"invalid CIDR {v!r}: {e}; write it like 10.1.0.0/16") from None
        return str(net)

    @model_validator(mode="after")
    def _gateway_inside(self) -> Subnet:
        if self.gateway is not None:
            net = ipaddress.ip_network(self.cidr)
            try:
                gw = ipaddress.ip_address(self.gateway)
            except ValueError:
                raise ValueError(f"gateway {self.gateway!r} is not an IP address") from None
            if gw not in net:
                raise ValueError(f"gateway {gw} is outside its subnet {net}; pick an address inside it")
        for pool in self.pools:
            start, _, end = pool.partition("-")
            try:
                lo, hi = ipaddress.ip_address(start.strip()), ipaddress.ip_address((end or start).strip())
            except ValueError:
                raise ValueError(f"pool {pool!r} is not 'first-last' of two addresses, like 10.1.0.10-10.1.0.99") \
                    from None
            if lo not in ipaddress.ip_network(self.cidr) or hi not in ipaddress.ip_network(self.cidr) or lo > hi:
                raise ValueError(f"pool {pool!r} must run from a first to a last address inside {self.cidr}")
        return self


class Network(Obj):
    kind: ClassVar[str] = "Network"
    name: Annotated[str, checked(check_dns_label, "network name")]
    # /api/v1 requires one; a Neutron network starts empty
    subnets: Annotated[list[Subnet], at_most(MAX_SUBNETS, "subnets")] = Field(default_factory=list)
    encap: Encapsulation = "vxlan"
    mtu: int | None = Field(default=None, ge=576, le=9000)  # None: derived from the underlay
    nat_outgoing: bool = False
    dns_domain: Annotated[str, checked(check_dns_domain)] = "tether.local"
    project: Annotated[str, checked(check_text, "project")] | None = None  # Neutron tenant/project
    block_size: int = Field(default=26, ge=16, le=32)  # IPv4 prefix length of IPAM blocks
    vni: int = Field(default=VNI, ge=1, le=16777215)  # one VTEP per host carries all networks
    external: bool = False
    description: Annotated[str, checked(check_text, "description")] = ""
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)
    # Neutron's free-text name when it is not a DNS label (`name`, the key, is then derived from it)
    display_name: Annotated[str, checked(check_text, "display_name")] | None = None



    @field_validator("vni")
    @classmethod
    def _vni(cls, v: int) -> int:
        if v != VNI:
            raise ValueError(f"vni {v} cannot be honoured: every host has one VTEP that carries all networks with "
                             f"VNI {VNI}; leave vni out")
        return v


class Block(Obj):
    """An IPAM block: the unit of address affinity to a host. Name is `<network>:<cidr with _>`."""

    kind: ClassVar[str] = "Block"
    network: str
    cidr: str
    host: str | None = None
    allocations: dict[str, str] = Field(default_factory=dict)  # ip -> handle (owner id)
    reserved: list[str] = Field(default_factory=list)  # never handed out (gateway, network, broadcast)
    empty_since: datetime | None = None


class Namespace(Obj):
    kind: ClassVar[str] = "Namespace"
    name: Annotated[str, checked(check_dns_label, "namespace name")]



class Owner(Strict):
    """Who an endpoint belongs to, so release by owner is idempotent."""

    type: Literal["cni", "docker", "vm", "api", "nested"] = "api"
    container_id: Annotated[str, checked(check_token, "owner.container_id", MAX_CONTAINER_ID)] | None = None
    ifname: Annotated[str, checked(check_named, "ifname_problem", "owner.ifname")] | None = None
    netns: Annotated[str, checked(check_named, "netns_problem", "owner.netns")] | None = None
    docker_endpoint_id: Annotated[str, checked(check_token, "owner.docker_endpoint_id", MAX_CONTAINER_ID)] | None = None
    device_id: str | None = None
    device_owner: str | None = None

    @field_validator("device_id", "device_owner")
    @classmethod
    def _device(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else check_text(v, f"owner.{info.field_name}")




class PortDecl(Strict):
    """A declared container port, so NetworkPolicy can use named ports."""

    name: Annotated[str, checked(check_port_name, "port name")]
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"



def check_port_name(value: str, what: str) -> str:
    if not IANA_SVC_NAME.match(value) or "--" in value or not any(c.isalpha() for c in value):
        raise ValueError(f"{what} {value[:80]!r} is not an IANA service name: 1-15 lower-case letters, digits and "
                         "'-' with at least one letter, no '-' at either end or twice in a row")
    return value


class AddressPair(Strict):
    ip_address: str  # an address or CIDR
    mac_address: Annotated[str, checked(check_mac, "mac_address")] | None = None

    @field_validator("ip_address")
    @classmethod
    def _ip(cls, v: str) -> str:
        return check_ip_or_cidr(v, "ip_address")



class Endpoint(Obj):
    """A container's or VM's interface. Keyed by id; `name` is unique within its network."""

    kind: ClassVar[str] = "Endpoint"
    name: Annotated[str, checked(check_dns_label, "endpoint name")]
    network: NetworkName
    host: HostName | None = None
    namespace: NamespaceName = "default"
    ips: list[str] = Field(default_factory=list)
    mac: Annotated[str, checked(check_mac, "mac")] | None = None
    owner: Owner = Field(default_factory=Owner)
    handle: Annotated[str, checked(check_token, "handle", MAX_HANDLE)] | None = None  # IPAM handle; defaults to the id
    # the host-side device name, derived by the server from the owner
    interface: Annotated[str, checked(check_named, "ifname_problem", "interface")] | None = None
    security_groups: list[str] = Field(default_factory=list)
    # Neutron's port security: on, the endpoint's security groups are its whole filter, so with no
    # group it passes nothing; off (Tether's and Kubernetes' default), an endpoint without groups is
    # filtered by NetworkPolicy and network isolation only. Naming a group turns it on; the Neutron
    # API turns it on for every port unless `port_security_enabled` is false.
    port_security: bool = False
    allowed_address_pairs: Annotated[list[AddressPair], at_most(MAX_ADDRESS_PAIRS, "allowed address pairs")] = Field(
        default_factory=list)
    ports: Annotated[list[PortDecl], at_most(MAX_PORT_DECLS, "declared ports")] = Field(default_factory=list)
    parent: Annotated[str, checked(check_id, "parent")] | None = None  # nested: the VM port this endpoint lives behind
    ready: bool = True
    status: Literal["pending", "active", "down"] = "pending"
    # Neutron's admin_state_up: a disabled endpoint's interface sends nothing (its ingress chain)
    admin_state_up: bool = True
    # source MAC/address checks on its interface; only Neutron's port_security_enabled=false turns
    # them off (an endpoint without port security still keeps them unless told)
    anti_spoofing: bool = True
    description: Annotated[str, checked(check_text, "description")] = ""
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)
    display_name: Annotated[str, checked(check_text, "display_name")] | None = None  # Neutron's free-text name
    dns_name: Annotated[str, checked(check_dns_label, "dns_name")] | None = None  # Neutron's dns_name

    def store_name(self) -> str:
        return self.id


    @field_validator("ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        check_unique_count(v, "addresses", MAX_ENDPOINT_IPS)
        out = [check_ip(ip, "address") for ip in v]
        dups = sorted({ip for ip in out if out.count(ip) > 1})
        if dups:
            raise ValueError(f"address {', '.join(dups)} is listed twice; list each address once")
        return out

    @field_validator("security_groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        check_unique_count(v, "security groups", MAX_SECURITY_GROUPS)
        return list(dict.fromkeys(check_id(g, "security group id") for g in v))

    @model_validator(mode="after")
    def _groups_mean_port_security(self) -> Endpoint:
        """An endpoint that names a group uses security groups: removing its groups later closes it
        (as in Neutron) instead of opening it to everyone."""
        if self.security_groups:
            self.port_security = True
        if self.port_security:  # port security on always checks sources (Neutron)
            self.anti_spoofing = True
        return self




class NetworkPolicy(Obj):
    """Kubernetes networking.k8s.io/v1 NetworkPolicy; `spec` keeps the Kubernetes schema verbatim."""

    kind: ClassVar[str] = "NetworkPolicy"
    namespaced: ClassVar[bool] = True
    namespace: NamespaceName = "default"
    spec: dict[str, Any] = Field(default_factory=dict)

    def store_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class SecurityGroupRule(Strict):
    id: Annotated[str, checked(check_id, "rule id")] = Field(default_factory=new_id)
    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | None = None  # tcp, udp, icmp, icmpv6, sctp, a number, or None for any
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: str | None = None
    remote_group_id: Annotated[str, checked(check_id, "remote_group_id")] | None = None
    description: Annotated[str, checked(check_text, "description")] = ""

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> str | None:
        """What the agent's compiler understands: a name nftables knows or an IP protocol number."""
        if v is None or v in ("", "any"):
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError("protocol must be a string or a number")
        p = v.lower()
        if p in RULE_PROTOCOLS:
            return p
        if p.isascii() and p.isdigit() and len(p) <= 3 and 0 <= int(p) <= 255:
            return str(int(p))
        raise ValueError(f"protocol {v[:80]!r} is not supported: use one of {', '.join(sorted(RULE_PROTOCOLS))}, "
                         "'any', or an IP protocol number 0-255")

    @model_validator(mode="after")
    def _ranges(self) -> SecurityGroupRule:
        lo, hi = self.port_range_min, self.port_range_max
        p = self.protocol
        num = None if p is None else PROTOCOL_NUMBERS[p] if p in PROTOCOL_NUMBERS else int(p)
        if lo is None and hi is None:
            pass
        elif num in (6, 17, 132):
            if lo is None:
                raise ValueError("port_range_max is set without port_range_min; give both (or only the minimum)")
            if hi is not None and lo > hi:
                raise ValueError(f"port_range_min {lo} is above port_range_max {hi}; swap them")
        elif num in (1, 58):  # Neutron's convention: min is the ICMP type, max the code
            if lo is None:
                raise ValueError("an ICMP code (port_range_max) needs a type (port_range_min)")
            if lo > 255 or (hi is not None and hi > 255):
                raise ValueError("ICMP type (port_range_min) and code (port_range_max) are 0-255")
        else:
            raise ValueError(f"port ranges need protocol tcp, udp, sctp, icmp or icmpv6, not {self.protocol or 'any'}")
        if self.remote_ip_prefix is not None:
            try:
                net = ipaddress.ip_network(self.remote_ip_prefix, strict=False)
            except ValueError:
                raise ValueError(f"remote_ip_prefix {self.remote_ip_prefix[:80]!r} is not a CIDR; write it like "
                                 "10.0.0.0/8") from None
            if (net.version == 4) != (self.ethertype == "IPv4"):
                raise ValueError(f"remote_ip_prefix {net} is IPv{net.version} but the rule's ethertype is "
                                 f"{self.ethertype}; make them match")
        return self


RULE_PROTOCOLS = {"tcp", "udp", "icmp", "icmpv6", "ipv6-icmp", "sctp"}
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "icmpv6": 58, "ipv6-icmp": 58}


class SecurityGroup(Obj):
    kind: ClassVar[str] = "SecurityGroup"
    description: Annotated[str, checked(check_text, "description")] = ""
    project: Annotated[str, checked(check_text, "project")] | None = None
    rules: Annotated[list[SecurityGroupRule], at_most(MAX_RULES, "rules")] = Field(default_factory=list)
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)


    def store_name(self) -> str:
        return self.id


DEFAULT_GROUP = "default"  # the name of every project's default group, and what a container names to join it
_DEFAULT_GROUP_IDS = uuid.UUID("5b0c3a52-5e8f-4d43-9a59-3c1f26d1f5a7")  # uuid5 namespace of default group ids


def default_group_id(project: str | None) -> str:
    """The id of a project's default group, derived from the project: every writer that creates it
    on first use writes the same key, so two racing writers cannot make two default groups."""
    return str(uuid.uuid5(_DEFAULT_GROUP_IDS, project or ""))


def default_security_group(project: str | None) -> SecurityGroup:
    """Neutron's default group: ingress only from its own members, all egress, IPv4 and IPv6."""
    gid = default_group_id(project)
    rules = [SecurityGroupRule(direction="ingress", ethertype=e, remote_group_id=gid) for e in ("IPv4", "IPv6")]
    rules += [SecurityGroupRule(direction="egress", ethertype=e) for e in ("IPv4", "IPv6")]
    return SecurityGroup(id=gid, name=DEFAULT_GROUP, description="Default security group", project=project or None,
                         rules=rules)


def is_default_group(sg: SecurityGroup) -> bool:
    return sg.id == default_group_id(sg.project)


class ServicePort(Strict):
    name: Annotated[str, checked(check_dns_label, "service port name")] | None = None
    protocol: Literal["TCP", "UDP"] = "TCP"
    port: int = Field(ge=1, le=65535)
    target_port: int | str | None = None  # number or a named port; default = port
    node_port: int | None = Field(default=None, ge=1, le=65535)  # published on every host's address

    @field_validator("target_port")
    @classmethod
    def _target(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and v.isascii() and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError(f"target_port {v} is not a port: use 1-65535 or a named port")
        if isinstance(v, str):
            check_port_name(v, "target_port")
        return v


class ServiceBackend(Strict):
    ip: Annotated[str, checked(check_ip, "backend ip")]
    endpoint: Annotated[str, checked(check_id, "backend endpoint")] | None = None  # endpoint id, when known




class Service(Obj):
    kind: ClassVar[str] = "Service"
    name: Annotated[str, checked(check_dns_label, "service name")]
    namespaced: ClassVar[bool] = True
    namespace: NamespaceName = "default"
    network: NetworkName | None = None
    # assigned from the service range when absent
    cluster_ip: Annotated[str, checked(check_ip, "cluster_ip")] | None = None
    ports: Annotated[list[ServicePort], at_most(MAX_SERVICE_PORTS, "ports")] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    # explicit, when no selector
    backends: Annotated[list[ServiceBackend], at_most(MAX_BACKENDS, "backends")] = Field(default_factory=list)
    session_affinity: Literal["None", "ClientIP"] = "None"
    affinity_timeout: int = Field(default=10800, ge=1)
    type: Literal["ClusterIP", "NodePort"] = "ClusterIP"
    # no virtual IP: the service's DNS name answers its ready backends' addresses (`clusterIP: None`)
    headless: bool = False
    # Local: node ports go only to backends on the host that received the packet, and keep the
    # client's address (no source NAT); Cluster: any backend, source-NATed to the host
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    # Docker's `-p` and CNI's hostPort: the node ports are published on this host only (on host_ip
    # only, when given: then only host_ip's family is published), not on every host; two services may
    # then share a node port on different hosts
    host: HostName | None = None
    host_ip: Annotated[str, checked(check_ip, "host_ip")] | None = None
    # Kubernetes' ipFamilies: one virtual IP per family, `cluster_ip` the first family's; the
    # server fills `cluster_ips` (the IPv4 one from the service range, the IPv6 one from the IPv6 range)
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=lambda: ["IPv4"], min_length=1, max_length=2)
    cluster_ips: list[Annotated[str, checked(check_ip, "cluster_ips")]] = Field(default_factory=list, max_length=2)
    # Octavia: the id of the load balancer whose VIP (an address of a network subnet, held by the
    # load balancer's VIP port) this service answers on; its cluster IP is then that VIP, not an
    # address of the service range, and several listeners' services share it
    load_balancer: Annotated[str, checked(check_id, "load_balancer")] | None = None

    def store_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def publishes_with(self, other: Service) -> bool:
        """True when the two services' node ports would be published on a common address."""
        if self.host is None or other.host is None:
            return True
        return self.host == other.host and (self.host_ip is None or other.host_ip is None
                                            or self.host_ip == other.host_ip)

    def vips(self) -> list[str]:
        """Every virtual IP of the service (one per IP family)."""
        return list(self.cluster_ips) or ([self.cluster_ip] if self.cluster_ip else [])


    @model_validator(mode="after")
    def _headless(self) -> Service:
        if self.headless and self.cluster_ip:
            raise ValueError(f"a headless service has no virtual IP, but cluster_ip is {self.cluster_ip}; "
                             "leave cluster_ip out or set headless false")
        if self.headless and self.type != "ClusterIP":
            raise ValueError("a headless service cannot be NodePort: there is no virtual IP to publish; "
                             "use type ClusterIP")
        if (self.host or self.host_ip) and self.type != "NodePort":
            raise ValueError("host and host_ip say where node ports are published: use type NodePort or leave them out")
        if self.host_ip and not self.host:
            raise ValueError(f"host_ip {self.host_ip} needs host, the host that has that address")
        if self.external_traffic_policy == "Local" and self.type != "NodePort":
            raise ValueError("external_traffic_policy Local applies to node ports: use type NodePort or leave the "
                             "policy at Cluster")
        return self

    @field_validator("ip_families")
    @classmethod
    def _families(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"ip_families {v} names a family twice; give IPv4, IPv6 or both once")
        return v

    @model_validator(mode="after")
    def _family_addresses(self) -> Service:
        if self.headless:
            if self.cluster_ips:
                raise ValueError(f"a headless service has no virtual IP, but cluster_ips is {self.cluster_ips}; "
                                 "leave cluster_ips out or set headless false")
            return self
        want = ["IPv4" if ":" not in ip else "IPv6" for ip in self.cluster_ips]
        if self.cluster_ips and want != self.ip_families[:len(want)]:
            raise ValueError(f"cluster_ips {self.cluster_ips} do not follow ip_families {self.ip_families} (one "
                             "address per family, in that order); leave cluster_ips out to have them assigned")
        if self.cluster_ip and ("IPv4" if ":" not in self.cluster_ip else "IPv6") != self.ip_families[0]:
            raise ValueError(f"cluster_ip {self.cluster_ip} is not of the first of ip_families {self.ip_families}; "
                             "give an address of that family or reorder ip_families")
        return self

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_labels(v)




class RouterInterface(Strict):
    """A router's leg on a tenant subnet (Neutron's router interface port): the router answers as
    the subnet's gateway address. Shown by the Neutron API as a port with device_owner
    `network:router_interface`, kept here so adding or removing a leg is one write."""

    subnet_id: Annotated[str, checked(check_id, "subnet_id")]
    network: NetworkName
    cidr: str  # the subnet's, so the datapath needs no lookup (and a later subnet change is seen)
    ip: Annotated[str, checked(check_ip, "ip")]  # the subnet's gateway address
    port_id: Annotated[str, checked(check_id, "port_id")] = Field(default_factory=new_id)


MAX_ROUTER_INTERFACES = 64


class Router(Obj):
    """Neutron's router, distributed: every host routes between the subnets of its interfaces and
    source-NATs them to its own address towards the outside when the router has an external
    gateway with SNAT (docs/ARCHITECTURE.md, "L3: routers and floating IPs")."""

    kind: ClassVar[str] = "Router"
    description: Annotated[str, checked(check_text, "description")] = ""
    project: Annotated[str, checked(check_text, "project")] | None = None
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)
    external_network: NetworkName | None = None  # the gateway's network (router:external)
    enable_snat: bool = True
    interfaces: Annotated[list[RouterInterface], at_most(MAX_ROUTER_INTERFACES, "router interfaces")] = Field(
        default_factory=list)

    def store_name(self) -> str:
        return self.id

    @model_validator(mode="after")
    def _one_leg_per_subnet(self) -> Router:
        subnets = [i.subnet_id for i in self.interfaces]
        if len(set(subnets)) != len(subnets):
            raise ValueError("a router has at most one interface per subnet")
        return self


class FloatingIP(Obj):
    """A floating IP: an address of an external network (held in IPAM by the endpoint
    `allocation`, device_owner `network:floatingip`) mapped 1:1 to a port's fixed address, by DNAT
    and SNAT on the port's host. `name` is the address."""

    kind: ClassVar[str] = "FloatingIP"
    network: NetworkName  # the external network
    address: Annotated[str, checked(check_ip, "floating_ip_address")]
    allocation: Annotated[str, checked(check_id, "allocation")]  # the endpoint holding the address
    endpoint: Annotated[str, checked(check_id, "port_id")] | None = None  # the port it maps to
    fixed_ip: Annotated[str, checked(check_ip, "fixed_ip_address")] | None = None
    router: Annotated[str, checked(check_id, "router_id")] | None = None
    description: Annotated[str, checked(check_text, "description")] = ""
    project: Annotated[str, checked(check_text, "project")] | None = None
    tags: Annotated[list[str], AfterValidator(check_tags)] = Field(default_factory=list)

    def store_name(self) -> str:
        return self.id

    @model_validator(mode="after")
    def _mapped(self) -> FloatingIP:
        if (self.endpoint is None) != (self.fixed_ip is None):
            raise ValueError("a floating IP maps to a port and one of its fixed addresses: give both or neither")
        if ipaddress.ip_address(self.address).version != 4 or (
                self.fixed_ip and ipaddress.ip_address(self.fixed_ip).version != 4):
            raise ValueError("floating IPs are IPv4 (as in Neutron)")
        return self


KINDS: dict[str, type[Obj]] = {
    c.kind: c for c in (Host, Network, Block, Namespace, Endpoint, NetworkPolicy, SecurityGroup, Service, Router,
                        FloatingIP)
}
# kinds written only through the Neutron API (/v2.0), which agents read from the snapshot and watch
# like every other; /api/v1, `tether get` and `tether apply` do not serve them
NEUTRON_ONLY_KINDS = ("Router", "FloatingIP")
# URL/CLI plural names
PLURALS: dict[str, str] = {
    "Host": "hosts",
    "Network": "networks",
    "Block": "blocks",
    "Namespace": "namespaces",
    "Endpoint": "endpoints",
    "NetworkPolicy": "networkpolicies",
    "SecurityGroup": "securitygroups",
    "Service": "services",
    "Router": "routers",
    "FloatingIP": "floatingips",
}


def key_of(kind: str, store_name: str) -> str:
    """The store key of an object: `/tether/v1/<plural>/<store_name>`."""
    return f"{PREFIX}{PLURALS[kind]}/{store_name}"


def kind_of_key(key: str) -> str | None:
    rest = key[len(PREFIX):] if key.startswith(PREFIX) else ""
    plural = rest.split("/", 1)[0]
    for kind, p in PLURALS.items():
        if p == plural:
            return kind
    return None


def decode(key: str, value: bytes) -> Obj | None:
    """Turn a stored value back into its object (None for keys that are not objects)."""
    kind = kind_of_key(key)
    if kind is None:
        return None
    return KINDS[kind].model_validate_json(value)


def encode(obj: Obj) -> bytes:
    return obj.model_dump_json(exclude={"revision"}).encode()
