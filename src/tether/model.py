"""The objects of Tether's desired state (DESIGN.md §2), shared by server, agent and CLI.

Every object is a pydantic model with `extra="forbid"`, so an unknown field is an error that names
the field. Objects are stored as JSON under `key_of(obj)`; the server fills `id`, `created_at` and
`revision` (the store revision of the object's last write).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PREFIX = "/tether/v1/"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

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
    for k, v in labels.items():
        if not LABEL_KEY.match(k):
            raise ValueError(f"label key {k!r} is invalid: use [prefix/]name with letters, digits, '-', '_', '.'")
        if not LABEL_VALUE.match(v):
            raise ValueError(f"label value {v!r} for {k!r} is invalid: at most 63 letters, digits, '-', '_', '.'")
    return labels


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Obj(Strict):
    """Fields every stored object has."""

    kind: ClassVar[str]
    namespaced: ClassVar[bool] = False

    id: str = Field(default_factory=new_id)
    name: str
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
    underlay_ip: str
    underlay_cidr: str | None = None  # the underlay subnet, for `auto` (direct inside it, vxlan across)
    vtep_mac: str | None = None
    vtep_ip: str | None = None  # the VXLAN device address (link-local style, unique per host)
    dns_ip: str | None = None  # where the host's agent answers DNS for its pods
    agent_version: str | None = None
    heartbeat: datetime | None = None
    lease_id: int | None = None
    status: HostStatus = Field(default_factory=HostStatus)  # reported by the host's agent

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_dns_label(v, "host name")

    @field_validator("underlay_ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))


class Subnet(Strict):
    cidr: str
    gateway: str | None = None  # informational for routed endpoints; Neutron and Docker expose it
    pools: list[str] = Field(default_factory=list)  # allocation ranges "a.b.c.d-a.b.c.e"; empty = whole CIDR
    id: str = Field(default_factory=new_id)
    name: str | None = None

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
        return self


class Network(Obj):
    kind: ClassVar[str] = "Network"
    subnets: list[Subnet] = Field(default_factory=list)  # /api/v1 requires one; a Neutron network starts empty
    encap: Encapsulation = "vxlan"
    mtu: int | None = Field(default=None, ge=576, le=9000)  # None: derived from the underlay
    nat_outgoing: bool = False
    dns_domain: str = "tether.local"
    project: str | None = None  # Neutron tenant/project
    block_size: int = Field(default=26, ge=16, le=32)  # IPv4 prefix length of IPAM blocks
    vni: int = Field(default=4096, ge=1, le=16777215)  # one VTEP per host carries all networks
    external: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_dns_label(v, "network name")


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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_dns_label(v, "namespace name")


class Owner(Strict):
    """Who an endpoint belongs to, so release by owner is idempotent."""

    type: Literal["cni", "docker", "vm", "api", "nested"] = "api"
    container_id: str | None = None
    ifname: str | None = None
    netns: str | None = None
    docker_endpoint_id: str | None = None
    device_id: str | None = None
    device_owner: str | None = None


class PortDecl(Strict):
    """A declared container port, so NetworkPolicy can use named ports."""

    name: str
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class AddressPair(Strict):
    ip_address: str  # an address or CIDR
    mac_address: str | None = None


class Endpoint(Obj):
    """A container's or VM's interface. Keyed by id; `name` is unique within its network."""

    kind: ClassVar[str] = "Endpoint"
    network: str
    host: str | None = None
    namespace: str = "default"
    ips: list[str] = Field(default_factory=list)
    mac: str | None = None
    owner: Owner = Field(default_factory=Owner)
    handle: str | None = None  # IPAM handle; defaults to the id
    interface: str | None = None  # host-side device name
    security_groups: list[str] = Field(default_factory=list)
    allowed_address_pairs: list[AddressPair] = Field(default_factory=list)
    ports: list[PortDecl] = Field(default_factory=list)
    parent: str | None = None  # nested: the VM port this endpoint lives behind
    ready: bool = True
    status: Literal["pending", "active", "down"] = "pending"

    def store_name(self) -> str:
        return self.id

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_dns_label(v, "endpoint name")


class NetworkPolicy(Obj):
    """Kubernetes networking.k8s.io/v1 NetworkPolicy; `spec` keeps the Kubernetes schema verbatim."""

    kind: ClassVar[str] = "NetworkPolicy"
    namespaced: ClassVar[bool] = True
    namespace: str = "default"
    spec: dict[str, Any] = Field(default_factory=dict)

    def store_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class SecurityGroupRule(Strict):
    id: str = Field(default_factory=new_id)
    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | None = None  # tcp, udp, icmp, icmpv6, sctp, a number, or None for any
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: str | None = None
    remote_group_id: str | None = None
    description: str = ""


class SecurityGroup(Obj):
    kind: ClassVar[str] = "SecurityGroup"
    description: str = ""
    project: str | None = None
    rules: list[SecurityGroupRule] = Field(default_factory=list)

    def store_name(self) -> str:
        return self.id


class ServicePort(Strict):
    name: str | None = None
    protocol: Literal["TCP", "UDP"] = "TCP"
    port: int = Field(ge=1, le=65535)
    target_port: int | str | None = None  # number or a named port; default = port
    node_port: int | None = Field(default=None, ge=1, le=65535)  # published on every host's address


class ServiceBackend(Strict):
    ip: str
    endpoint: str | None = None  # endpoint id, when known


class Service(Obj):
    kind: ClassVar[str] = "Service"
    namespaced: ClassVar[bool] = True
    namespace: str = "default"
    network: str | None = None
    cluster_ip: str | None = None  # assigned from the service range when absent
    ports: list[ServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    backends: list[ServiceBackend] = Field(default_factory=list)  # explicit, when no selector
    session_affinity: Literal["None", "ClientIP"] = "None"
    affinity_timeout: int = Field(default=10800, ge=1)
    type: Literal["ClusterIP", "NodePort"] = "ClusterIP"

    def store_name(self) -> str:
        return f"{self.namespace}/{self.name}"


KINDS: dict[str, type[Obj]] = {
    c.kind: c for c in (Host, Network, Block, Namespace, Endpoint, NetworkPolicy, SecurityGroup, Service)
}
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
