"""The CNI protocol, apart from any networking: parsing requests, versions, errors and results.

Follows the CNI specification (commands ADD, DEL, CHECK, STATUS, GC, VERSION; error codes; result
formats of 0.3.x/0.4.0 and 1.x). The agent answers in the version the runtime asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tether.calc.names import POD_GATEWAY6

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = "1.1.0"
COMMANDS = {"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"}

# error codes of the specification
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
CHECK_FAILED = 110  # plugin-specific (>= 100)

KNOWN_CONFIG = {"cniVersion", "name", "type", "network", "agent_socket", "security_groups", "labels", "namespace",
                "prevResult", "runtimeConfig", "capabilities", "args", "ipam", "dns", "ports", "mtu",
                "cni.dev/valid-attachments", "cniVersions", "disableCheck", "disableGC", "plugins",
                "kubernetes"}  # {"kubeconfig": path}: the pod's labels are read from the apiserver at ADD
CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass
class Request:
    command: str
    version: str
    config: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def network(self) -> str:
        return self.config.get("network") or self.config["name"]

    @property
    def handle(self) -> str:
        return f"{self.container_id}/{self.ifname}"


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def parse_args(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise CniError(INVALID_ENV, f"CNI_ARGS item {part!r} is not KEY=VALUE")
        out[k] = v
    return out


def parse_request(env: dict[str, str], stdin: bytes) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(sorted(COMMANDS))}")
    if command == "VERSION" and not stdin.strip():
        return Request("VERSION", LATEST, {})
    try:
        config = json.loads(stdin or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, f"network configuration on stdin is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "network configuration on stdin must be a JSON object")
    version = config.get("cniVersion")
    if command == "VERSION":
        return Request("VERSION", version or LATEST, config)
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "network configuration has no cniVersion; add e.g. \"cniVersion\": \"1.0.0\"")
    if version not in SUPPORTED:
        raise CniError(INCOMPATIBLE_VERSION, f"CNI version {version} is not supported; this plugin supports "
                                             f"{', '.join(SUPPORTED)}")
    if command in ("STATUS", "GC") and version_tuple(version) < (1, 1, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later (config has {version})")
    for key in ("name", "type"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise CniError(INVALID_CONFIG, f"network configuration needs a string {key!r}")
    unknown = sorted(set(config) - KNOWN_CONFIG)
    if unknown:
        raise CniError(UNSUPPORTED_FIELD, f"unsupported field(s) in network configuration: {', '.join(unknown)}; "
                                          "see the tether CNI documentation for the accepted keys")
    for key in ("labels",):
        if key in config and not isinstance(config[key], dict):
            raise CniError(INVALID_CONFIG, f"{key!r} must be an object of string labels")
    if "security_groups" in config and not isinstance(config["security_groups"], list):
        raise CniError(INVALID_CONFIG, "'security_groups' must be a list of security group ids")
    kube = config.get("kubernetes")
    if kube is not None and not (isinstance(kube, dict) and isinstance(kube.get("kubeconfig"), str)):
        raise CniError(INVALID_CONFIG, "'kubernetes' must be an object {\"kubeconfig\": \"/path/to/kubeconfig\"}")
    req = Request(command, version, config, path=env.get("CNI_PATH", ""))
    if command in ("STATUS", "GC"):
        return req
    req.container_id = env.get("CNI_CONTAINERID", "")
    req.netns = env.get("CNI_NETNS", "")
    req.ifname = env.get("CNI_IFNAME", "")
    if not req.container_id:
        raise CniError(INVALID_ENV, "CNI_CONTAINERID is not set")
    if not CONTAINER_ID.match(req.container_id):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {req.container_id!r} has characters other than letters, "
                                    "digits, '_', '.', '-'")
    if not req.ifname:
        raise CniError(INVALID_ENV, "CNI_IFNAME is not set")
    if len(req.ifname) > 15 or "/" in req.ifname or req.ifname in (".", ".."):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {req.ifname!r} is not a valid interface name (max 15 chars)")
    if command in ("ADD", "CHECK") and not req.netns:
        raise CniError(INVALID_ENV, f"CNI_NETNS is not set (needed for {command})")
    req.args = parse_args(env.get("CNI_ARGS", ""))
    if "prevResult" in config and not isinstance(config["prevResult"], dict):
        raise CniError(INVALID_CONFIG, "prevResult must be the previous plugin's result object")
    if command == "CHECK" and "prevResult" not in config:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
    return req


def error_json(version: str, err: CniError) -> bytes:
    body: dict[str, Any] = {"cniVersion": version if version in SUPPORTED else LATEST, "code": err.code,
                            "msg": err.msg}
    if err.details:
        body["details"] = err.details
    return json.dumps(body).encode()


def version_json(version: str) -> bytes:
    return json.dumps({"cniVersion": version if version in SUPPORTED else LATEST,
                       "supportedVersions": SUPPORTED}).encode()


@dataclass
class Attachment:
    """What ADD made, in version-neutral form."""

    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    sandbox: str
    ips: list[str]
    gateway: str
    dns: dict[str, Any] = field(default_factory=dict)
    mtu: int | None = None


def result(version: str, a: Attachment) -> dict[str, Any]:
    legacy = version_tuple(version) < (1, 0, 0)
    ifaces: list[dict[str, Any]] = [
        {"name": a.host_ifname, "mac": a.host_mac},
        {"name": a.ifname, "mac": a.mac, "sandbox": a.sandbox},
    ]
    if a.mtu and not legacy:
        ifaces[1]["mtu"] = a.mtu
    ips = []
    for ip in a.ips:
        v6 = ":" in ip
        entry: dict[str, Any] = {"address": f"{ip}/{128 if v6 else 32}", "interface": 1}
        entry["gateway"] = POD_GATEWAY6 if v6 else a.gateway
        if legacy:
            entry["version"] = "6" if v6 else "4"
        ips.append(entry)
    routes = [{"dst": "0.0.0.0/0", "gw": a.gateway}] if any(":" not in ip for ip in a.ips) else []
    if any(":" in ip for ip in a.ips):
        routes.append({"dst": "::/0", "gw": POD_GATEWAY6})
    out: dict[str, Any] = {"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes}
    if a.dns:
        out["dns"] = a.dns
    return out


def chain(prev: dict[str, Any] | None, ours: dict[str, Any]) -> dict[str, Any]:
    """Our result appended to the previous plugin's (CNI chaining: a plugin passes prevResult on).
    Our `interface` indexes shift past the previous interfaces; our DNS wins when we have one."""
    if not prev:
        return ours
    prev_ifaces = list(prev.get("interfaces") or [])
    shift = len(prev_ifaces)
    ips = list(prev.get("ips") or [])
    for ip in ours["ips"]:
        ip = dict(ip)
        if "interface" in ip:
            ip["interface"] += shift
        ips.append(ip)
    out = {**ours, "interfaces": prev_ifaces + ours["interfaces"], "ips": ips,
           "routes": list(prev.get("routes") or []) + ours["routes"]}
    if "dns" not in ours and prev.get("dns"):
        out["dns"] = prev["dns"]
    return out


def prev_ips(config: dict[str, Any]) -> list[str]:
    prev = config.get("prevResult") or {}
    return [ip["address"].split("/")[0] for ip in prev.get("ips", []) if "address" in ip]


def valid_attachments(config: dict[str, Any]) -> set[tuple[str, str]]:
    items = config.get("cni.dev/valid-attachments") or []
    if not isinstance(items, list):
        raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    return {(i.get("containerID", ""), i.get("ifname", "")) for i in items if isinstance(i, dict)}
