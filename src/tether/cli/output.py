"""Printing objects as rich tables, JSON or YAML (`-o table|json|yaml` on every read)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any


class Format(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


Column = tuple[str, Callable[[dict], Any]]


def labels(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (d.get("labels") or {}).items())


COLUMNS: dict[str, list[Column]] = {
    "Network": [("NAME", lambda d: d["name"]), ("SUBNETS", lambda d: ",".join(s["cidr"] for s in d["subnets"])),
                ("ENCAP", lambda d: d["encap"]), ("NAT", lambda d: "yes" if d["nat_outgoing"] else "no"),
                ("MTU", lambda d: d["mtu"] or "auto"), ("BLOCK", lambda d: f"/{d['block_size']}")],
    "Endpoint": [("NAME", lambda d: d["name"]), ("NAMESPACE", lambda d: d["namespace"]),
                 ("NETWORK", lambda d: d["network"]), ("HOST", lambda d: d["host"] or "-"),
                 ("IPS", lambda d: ",".join(d["ips"])), ("OWNER", lambda d: d["owner"]["type"]),
                 ("LABELS", labels), ("ID", lambda d: d["id"][:8])],
    "Host": [("NAME", lambda d: d["name"]), ("UNDERLAY", lambda d: d["underlay_ip"]),
             ("VTEP", lambda d: d.get("vtep_ip") or "-"), ("ALIVE", lambda d: {True: "yes", False: "no"}.get(
                 d.get("alive"), "?")), ("LABELS", labels)],
    "Block": [("CIDR", lambda d: d["cidr"]), ("NETWORK", lambda d: d["network"]), ("HOST", lambda d: d["host"]),
              ("IN USE", lambda d: len(d["allocations"]))],
    "Namespace": [("NAME", lambda d: d["name"]), ("LABELS", labels)],
    "NetworkPolicy": [("NAMESPACE", lambda d: d["namespace"]), ("NAME", lambda d: d["name"]),
                      ("POD SELECTOR", lambda d: json.dumps(d["spec"].get("podSelector", {}))),
                      ("TYPES", lambda d: ",".join(d["spec"].get("policyTypes") or []) or "default")],
    "SecurityGroup": [("NAME", lambda d: d["name"]), ("ID", lambda d: d["id"]), ("RULES", lambda d: len(d["rules"]))],
    "Service": [("NAMESPACE", lambda d: d["namespace"]), ("NAME", lambda d: d["name"]),
                ("CLUSTER-IP", lambda d: "None (headless)" if d.get("headless") else d.get("cluster_ip") or "-"),
                ("PORTS", lambda d: ",".join(f"{p['port']}/{p['protocol']}" + (f":{p['node_port']}" if p.get(
                    "node_port") else "") for p in d["ports"])),
                ("SELECTOR", lambda d: ",".join(f"{k}={v}" for k, v in (d.get("selector") or {}).items()))],
}


def emit(kind: str, items: Sequence[dict] | dict, fmt: Format, title: str | None = None) -> None:
    if fmt == Format.json:
        print(json.dumps(items, indent=2, default=str))
        return
    if fmt == Format.yaml:
        import yaml

        print(yaml.safe_dump(items, sort_keys=False, default_flow_style=False), end="")
        return
    from rich.console import Console
    from rich.table import Table

    rows = [items] if isinstance(items, dict) else list(items)
    cols = COLUMNS.get(kind, [("NAME", lambda d: d.get("name"))])
    table = Table(title=title, box=None, header_style="bold")
    for name, _ in cols:
        table.add_column(name)
    for d in rows:
        table.add_row(*(str(f(d)) for _, f in cols))
    Console().print(table)
