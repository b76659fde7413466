"""What a host's kernel holds for Tether, read back for tests and `tether lab status`.

`kernel_state(ns)` is a comparable snapshot (links with their ifindex, Tether routes, permanent
neighbours, VXLAN FDB, the nft table with counters zeroed): equal snapshots before and after an
agent restart mean the restart changed nothing. `leftovers(ns)` lists what pods leave behind.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tether.calc.names import LINK_PREFIX, RTPROT_TETHER, VTEP_NAME


def _json(*cmd: str) -> Any:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return json.loads(r.stdout)


def _comparable(obj: Any, handles: bool) -> Any:
    """nft JSON with counters zeroed and, unless `handles`, without object handles."""
    if isinstance(obj, dict):
        return {k: ({"packets": 0, "bytes": 0} if k == "counter" else _comparable(v, handles))
                for k, v in obj.items() if handles or k != "handle"}
    if isinstance(obj, list):
        return [_comparable(v, handles) for v in obj]
    return obj


def kernel_state(ns: str, handles: bool = True) -> dict[str, Any]:
    """`handles=False` compares nft content only: a table rebuilt with the same content is equal,
    whatever order its chains and sets were created in (rules keep their order within a chain)."""
    links = sorted((link["ifname"], link["ifindex"], link.get("mtu"), link.get("address"), tuple(link.get("flags", [])))
                   for link in _json("ip", "-n", ns, "-j", "link", "show") if link["ifname"].startswith(LINK_PREFIX))
    routes = sorted(json.dumps(r, sort_keys=True) for r in _json("ip", "-n", ns, "-j", "route", "show", "proto",
                                                                    str(RTPROT_TETHER)))
    neigh = sorted(json.dumps(n, sort_keys=True) for n in _json("ip", "-n", ns, "-j", "neigh", "show", "nud",
                                                                   "permanent"))
    fdb = sorted(json.dumps(f, sort_keys=True) for f in _json("bridge", "-n", ns, "-j", "fdb", "show", "dev",
                                                                 VTEP_NAME))
    nft = _json("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "tether")
    nft_items = nft.get("nftables", []) if isinstance(nft, dict) else []
    return {"links": links, "routes": routes, "neighbours": neigh, "fdb": fdb,
            "nft": _comparable(_by_object([i for i in nft_items if "metainfo" not in i], handles), handles)}


def _by_object(items: list[dict], handles: bool) -> list[dict]:
    """Unless `handles`, the listing sorted by object (stable: a chain's rules stay in order)."""
    if handles:
        return items

    def key(item: dict) -> tuple[str, str]:
        kind, body = next(iter(item.items()))
        return body.get("chain", body.get("name", "")), "" if kind != "rule" else "~"
    return sorted(items, key=key)


def leftovers(ns: str) -> dict[str, list]:
    """Per-pod objects still present in a host namespace: veths, /32 routes, ep map elements and
    ingress chains."""
    veths = [link["ifname"] for link in _json("ip", "-n", ns, "-j", "link", "show")
             if link["ifname"].startswith(LINK_PREFIX) and link["ifname"] != VTEP_NAME]
    host_routes = [r["dst"] for r in _json("ip", "-n", ns, "-j", "route", "show", "proto", str(RTPROT_TETHER))
                   if r.get("dev", "").startswith(LINK_PREFIX) and r.get("dev") != VTEP_NAME]
    table = _json("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "tether")
    elements, chains = [], []
    for item in (table.get("nftables", []) if isinstance(table, dict) else []):
        if "map" in item and item["map"]["name"] in ("ep_in", "ep_out"):
            elements += [f"{item['map']['name']}:{e[0]}" for e in item["map"].get("elem", [])]
        if "chain" in item and item["chain"].get("hook") == "ingress":  # a pod's own (pod_ingress)
            chains.append(item["chain"]["name"])
    return {"veths": veths, "pod_routes": host_routes, "nft_elements": elements, "nft_chains": chains}
