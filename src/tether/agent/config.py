"""The agent's configuration: what `tether agent`'s options say, and what is found before the loop starts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentConfig:
    server: str
    host: str
    underlay_ip: str
    underlay_dev: str | None = None
    state_dir: str = "/var/lib/tether-agent"
    cni_socket: str = "/run/tether/cni.sock"
    token: str | None = None
    ca_file: str | None = None  # the cluster CA that https:// servers are verified against
    heartbeat_ttl: float = 15.0
    reconcile_interval: float = 30.0
    labels: dict[str, str] = field(default_factory=dict)
    underlay: tuple[str, int, str] | None = None  # (device, MTU, CIDR), found before the event loop starts
    dns_ip: str | None = None  # where the DNS extra answers (None: its default; "off": no DNS)
    dns_port: int = 53
    upstream_dns: list[str] = field(default_factory=list)  # empty: the host's /etc/resolv.conf
    flows: bool = True  # record connections (conntrack events) and push them to the server
    metrics_listen: str | None = None  # host:port of the Prometheus endpoint (None: the unix socket only)
