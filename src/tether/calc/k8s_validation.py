"""NetworkPolicy validation with the messages the Kubernetes API server gives.

Users bring manifests written for Kubernetes; when one is wrong they should read the same error
`kubectl apply` would print (field path, then `Required value`, `Invalid value`, `Unsupported value`
or `Forbidden`), so they can search for it. Rules follow `pkg/apis/networking/validation` and
`metav1validation.ValidateLabelSelector`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
SPEC_FIELDS = {"podSelector", "ingress", "egress", "policyTypes"}
RULE_FIELDS = {"ingress": {"from", "ports"}, "egress": {"to", "ports"}}
PEER_FIELDS = {"podSelector", "namespaceSelector", "ipBlock"}
PORT_FIELDS = {"protocol", "port", "endPort"}
SELECTOR_FIELDS = {"matchLabels", "matchExpressions"}
EXPR_FIELDS = {"key", "operator", "values"}


class PolicyInvalid(ValueError):
    """A NetworkPolicy the Kubernetes API server would reject; `errors` are its field errors."""

    def __init__(self, name: str, errors: list[str]) -> None:
        self.errors = errors
        body = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        super().__init__(f'NetworkPolicy.networking.k8s.io "{name}" is invalid: {body}')


def _q(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def _unknown(obj: dict, allowed: set[str], path: str, errs: list[str]) -> None:
    for k in obj:
        if k not in allowed:
            errs.append(f'unknown field "{path}.{k}"')


def _label_key(key: Any, path: str, errs: list[str]) -> None:
    if not isinstance(key, str) or not key:
        errs.append(f"{path}: Invalid value: {_q(key)}: name part must be non-empty")
        return
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        errs.append(f"{path}: Invalid value: {_q(key)}: prefix part a lowercase RFC 1123 subdomain must consist of "
                    "lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                    "character")
    if len(name) > 63 or not QUALIFIED_NAME.match(name):
        errs.append(f"{path}: Invalid value: {_q(key)}: name part must consist of alphanumeric characters, '-', "
                    "'_' or '.', and must start and end with an alphanumeric character")


def _label_value(v: Any, path: str, errs: list[str]) -> None:
    if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
        errs.append(f"{path}: Invalid value: {_q(v)}: a valid label must be an empty string or consist of "
                    "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")


def validate_selector(sel: Any, path: str, errs: list[str]) -> None:
    if sel is None:
        return
    if not isinstance(sel, dict):
        errs.append(f"{path}: Invalid value: {_q(sel)}: must be a label selector object")
        return
    _unknown(sel, SELECTOR_FIELDS, path, errs)
    for k, v in (sel.get("matchLabels") or {}).items():
        _label_key(k, f"{path}.matchLabels", errs)
        _label_value(v, f"{path}.matchLabels", errs)
    for i, e in enumerate(sel.get("matchExpressions") or []):
        p = f"{path}.matchExpressions[{i}]"
        if not isinstance(e, dict):
            errs.append(f"{p}: Invalid value: {_q(e)}: must be an object")
            continue
        _unknown(e, EXPR_FIELDS, p, errs)
        op, values = e.get("operator"), e.get("values") or []
        if op in ("In", "NotIn"):
            if not values:
                errs.append(f"{p}.values: Required value: must be specified when `operator` is 'In' or 'NotIn'")
        elif op in ("Exists", "DoesNotExist"):
            if values:
                errs.append(f"{p}.values: Forbidden: may not be specified when `operator` is 'Exists' or "
                            "'DoesNotExist'")
        else:
            errs.append(f"{p}.operator: Invalid value: {_q(op)}: not a valid selector operator")
        _label_key(e.get("key"), f"{p}.key", errs)
        for j, v in enumerate(values):
            _label_value(v, f"{p}.values[{j}]", errs)


def _port(port: Any, path: str, errs: list[str]) -> None:
    if not isinstance(port, dict):
        errs.append(f"{path}: Invalid value: {_q(port)}: must be an object")
        return
    _unknown(port, PORT_FIELDS, path, errs)
    proto = port.get("protocol", "TCP")
    if proto not in ("TCP", "UDP", "SCTP"):
        errs.append(f'{path}.protocol: Unsupported value: {_q(proto)}: supported values: "SCTP", "TCP", "UDP"')
    p, end = port.get("port"), port.get("endPort")
    if isinstance(p, bool) or (p is not None and not isinstance(p, int | str)):
        errs.append(f"{path}.port: Invalid value: {_q(p)}: must be an integer or a string")
        return
    if isinstance(p, int) and not 1 <= p <= 65535:
        errs.append(f"{path}.port: Invalid value: {p}: must be between 1 and 65535, inclusive")
    if isinstance(p, str):
        if p.isdigit():
            errs.append(f"{path}.port: Invalid value: {_q(p)}: must contain at least one letter (a-z)")
        elif len(p) > 15 or not IANA_SVC_NAME.match(p) or "--" in p:
            errs.append(f"{path}.port: Invalid value: {_q(p)}: must contain only alpha-numeric characters (a-z, "
                        "0-9), and hyphens (-), at most 15 characters, not start or end with a hyphen")
    if end is not None:
        if not isinstance(end, int) or isinstance(end, bool) or not 1 <= end <= 65535:
            errs.append(f"{path}.endPort: Invalid value: {_q(end)}: must be between 1 and 65535, inclusive")
        elif p is None:
            errs.append(f"{path}.port: Required value: must be specified when endPort is specified")
        elif isinstance(p, str):
            errs.append(f"{path}.endPort: Invalid value: {end}: may not be specified when `port` is non-numeric")
        elif end < p:
            errs.append(f"{path}.endPort: Invalid value: {end}: must be greater than or equal to `port`")


def _cidr(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) and "/" in v else None
    except ValueError:
        return None


def _peer(peer: Any, path: str, errs: list[str]) -> None:
    if not isinstance(peer, dict):
        errs.append(f"{path}: Invalid value: {_q(peer)}: must be an object")
        return
    _unknown(peer, PEER_FIELDS, path, errs)
    present = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(k) is not None]
    if not present:
        errs.append(f"{path}: Required value: must specify a peer")
    elif "ipBlock" in present and len(present) > 1:
        errs.append(f"{path}: Forbidden: may not specify both ipBlock and another peer")
    validate_selector(peer.get("podSelector"), f"{path}.podSelector", errs)
    validate_selector(peer.get("namespaceSelector"), f"{path}.namespaceSelector", errs)
    block = peer.get("ipBlock")
    if block is None:
        return
    bp = f"{path}.ipBlock"
    if not isinstance(block, dict):
        errs.append(f"{bp}: Invalid value: {_q(block)}: must be an object")
        return
    _unknown(block, {"cidr", "except"}, bp, errs)
    cidr = block.get("cidr")
    if not cidr:
        errs.append(f"{bp}.cidr: Required value")
        return
    net = _cidr(cidr)
    if net is None:
        errs.append(f"{bp}.cidr: Invalid value: {_q(cidr)}: must be a valid CIDR value, "
                    "(e.g. 10.9.8.0/24 or 2001:db8::/64)")
        return
    for i, x in enumerate(block.get("except") or []):
        sub = _cidr(x)
        if sub is None:
            errs.append(f"{bp}.except[{i}]: Invalid value: {_q(x)}: must be a valid CIDR value, "
                        "(e.g. 10.9.8.0/24 or 2001:db8::/64)")
        elif sub.version != net.version or not sub.subnet_of(net) or sub.prefixlen <= net.prefixlen:  # type: ignore[arg-type]
            errs.append(f"{bp}.except[{i}]: Invalid value: {_q(x)}: must be a strict subset of `cidr`")


def validate_network_policy(spec: Any, name: str | None = None) -> list[str]:
    """Field errors for a NetworkPolicy spec (empty when Kubernetes would accept it)."""
    errs: list[str] = []
    if name is not None and (len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
        errs.append(f"metadata.name: Invalid value: {_q(name)}: a lowercase RFC 1123 subdomain must consist of lower "
                    "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character "
                    "(e.g. 'example.com', regex used for validation is "
                    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
    if not isinstance(spec, dict):
        return [*errs, f"spec: Invalid value: {_q(spec)}: must be an object"]
    _unknown(spec, SPEC_FIELDS, "spec", errs)
    validate_selector(spec.get("podSelector"), "spec.podSelector", errs)
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        rules = spec.get(direction)
        if rules is None:
            continue
        if not isinstance(rules, list):
            errs.append(f"spec.{direction}: Invalid value: {_q(rules)}: must be a list")
            continue
        for i, r in enumerate(rules):
            rp = f"spec.{direction}[{i}]"
            if r is None:
                continue
            if not isinstance(r, dict):
                errs.append(f"{rp}: Invalid value: {_q(r)}: must be an object")
                continue
            _unknown(r, RULE_FIELDS[direction], rp, errs)
            for j, port in enumerate(r.get("ports") or []):
                _port(port, f"{rp}.ports[{j}]", errs)
            for j, peer in enumerate(r.get(peers_key) or []):
                _peer(peer, f"{rp}.{peers_key}[{j}]", errs)
    types = spec.get("policyTypes")
    if types is not None:
        if not isinstance(types, list):
            errs.append(f"spec.policyTypes: Invalid value: {_q(types)}: must be a list")
        else:
            for i, t in enumerate(types):
                if t not in ("Ingress", "Egress"):
                    errs.append(f'spec.policyTypes[{i}]: Unsupported value: {_q(t)}: supported values: '
                                '"Egress", "Ingress"')
            if len(types) > 2:
                errs.append(f"spec.policyTypes: Invalid value: {_q(types)}: may not specify more than two "
                            "policyTypes")
    return errs


def check_policy(name: str, spec: Any) -> None:
    """Raise PolicyInvalid with Kubernetes' wording when the policy would be rejected."""
    errors = validate_network_policy(spec, name)
    if errors:
        raise PolicyInvalid(name, errors)
