"""YAML/JSON documents -> Tether objects: Tether kinds and unchanged Kubernetes manifests.

Tether documents look like Kubernetes ones: `apiVersion: tether.dev/v1`, `kind`, `metadata`
(name, namespace, labels, and the server's id, created_at, revision) and `spec` (the object's
fields); `status` is what the system reports and is never applied. `tether get -o yaml` prints this
form (`to_document`), so its output can be applied again. Kubernetes `Namespace` (v1),
`NetworkPolicy` (networking.k8s.io/v1) and `Service` (v1) are accepted as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from pydantic import ValidationError

from tether.model import KINDS, NEUTRON_ONLY_KINDS, Namespace, NetworkPolicy, Obj, Service, ServicePort

TETHER_API = "tether.dev/v1"
K8S_KINDS = {("v1", "Namespace"), ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Service")}


METADATA = ("name", "namespace", "id", "labels", "created_at", "revision")
# what the system reports rather than what a user declares: shown under `status`, never applied
STATUS = {"Host": ("status", "heartbeat", "lease_id", "alive"), "Endpoint": ("status", "quarantined", "invalid")}


class ManifestError(ValueError):
    pass


def has_namespace(kind: str) -> bool:
    return KINDS[kind].namespaced or kind == "Endpoint"


def to_document(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """An object as the API returns it -> the document `apply -f` takes back unchanged."""
    meta_keys = [k for k in METADATA if k != "namespace" or has_namespace(kind)]
    metadata = {k: data[k] for k in meta_keys if k in data}
    reported = STATUS.get(kind, ())
    spec = {k: v for k, v in data.items() if k not in metadata and k not in reported}
    if kind == "NetworkPolicy":  # its spec is the Kubernetes one, as in networking.k8s.io/v1
        spec = data.get("spec") or {}
    doc: dict[str, Any] = {"apiVersion": TETHER_API, "kind": kind, "metadata": metadata, "spec": spec}
    status: dict[str, Any] = {}
    for k in reported:
        if k in data:
            v = data[k]
            status.update(v if isinstance(v, dict) and k == "status" else {("state" if k == "status" else k): v})
    if status:
        doc["status"] = status
    return doc


def to_list(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": TETHER_API, "kind": "List", "items": [to_document(kind, d) for d in items]}


def load_documents(text: str) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"not valid YAML/JSON: {e}") from None
    out: list[dict[str, Any]] = []
    for d in docs:
        if not isinstance(d, dict):
            raise ManifestError(f"a document must be a mapping with apiVersion and kind, got {type(d).__name__}")
        if d.get("kind") == "List" or (d.get("kind", "").endswith("List") and "items" in d):
            out.extend(d.get("items") or [])
        else:
            out.append(d)
    return out


def to_object(doc: dict[str, Any], index: int = 0, warn: Callable[[str], None] = lambda _m: None) -> Obj:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata") or {}
    where = f"document {index + 1} ({kind or '?'} {meta.get('name', '?')})"
    if not kind or not api:
        raise ManifestError(f"{where}: apiVersion and kind are required")
    try:
        if api == TETHER_API:
            if kind not in KINDS or kind in NEUTRON_ONLY_KINDS:
                served = sorted(set(KINDS) - set(NEUTRON_ONLY_KINDS))
                why = " (routers and floating IPs are made through the Neutron API: `openstack router create`)" \
                    if kind in NEUTRON_ONLY_KINDS else ""
                raise ManifestError(f"{where}: unknown kind {kind!r}{why}; Tether kinds: {', '.join(served)}")
            cls = KINDS[kind]
            data = dict(doc.get("spec") or {})
            if kind == "NetworkPolicy":
                data = {"spec": data}
            unknown = sorted(set(meta) - set(METADATA))
            if unknown:
                raise ManifestError(f"{where}: unknown metadata field(s) {', '.join(unknown)}; metadata holds "
                                    f"{', '.join(METADATA)} (the rest goes under spec)")
            data["name"] = meta.get("name")
            if meta.get("labels"):
                data["labels"] = meta["labels"]
            if has_namespace(kind):
                data["namespace"] = meta.get("namespace", data.get("namespace", "default"))
            for k in ("id", "created_at", "revision"):
                if k in meta:
                    data[k] = meta[k]
            return cls.model_validate(data)
        if (api, kind) not in K8S_KINDS:
            raise ManifestError(f"{where}: unsupported apiVersion/kind {api}/{kind}; accepted: Tether kinds "
                                f"({TETHER_API}), v1 Namespace, networking.k8s.io/v1 NetworkPolicy, v1 Service")
        if kind == "Namespace":
            return Namespace(name=meta.get("name"), labels=meta.get("labels") or {})
        if kind == "NetworkPolicy":
            return NetworkPolicy(name=meta.get("name"), namespace=meta.get("namespace", "default"),
                                 labels=meta.get("labels") or {}, spec=doc.get("spec") or {})
        return k8s_service(doc, warn)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ManifestError(f"{where}: {msgs}") from None


# Kubernetes Service fields: what Tether does with each. Anything else is refused by name.
SERVICE_DONE = {"selector", "ports", "clusterIP", "clusterIPs", "type", "sessionAffinity", "sessionAffinityConfig",
                "externalTrafficPolicy", "internalTrafficPolicy", "ipFamilies", "ipFamilyPolicy"}
SERVICE_REFUSED = {
    "externalIPs": "Tether does not answer on extra external addresses; use type NodePort",
    "externalName": "ExternalName services (DNS aliases) are not implemented",
    "loadBalancerIP": "there is no load-balancer integration; use type NodePort",
    "loadBalancerSourceRanges": "there is no load-balancer integration; use a NetworkPolicy",
    "loadBalancerClass": "there is no load-balancer integration",
    "allocateLoadBalancerNodePorts": "there is no load-balancer integration",
    "healthCheckNodePort": "there is no load-balancer health check",
    "publishNotReadyAddresses": "only ready endpoints are published",
    "trafficDistribution": "backends are chosen at random, with no topology preference",
}
PORT_DONE = {"name", "protocol", "port", "targetPort", "nodePort"}
PORT_IGNORED = {"appProtocol": "informational: Tether balances connections whatever the protocol"}


def _service_fields(name: str, spec: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Refuse by name what Tether does not implement; warn about what it accepts but does not use."""
    where = f"Service {name}"
    for field, why in SERVICE_REFUSED.items():
        if spec.get(field) not in (None, [], False):
            raise ManifestError(f"{where}: spec.{field} is not supported: {why}; remove it")
    unknown = sorted(set(spec) - SERVICE_DONE - set(SERVICE_REFUSED))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) spec.{', spec.'.join(unknown)}; Tether reads "
                            f"{', '.join(sorted(SERVICE_DONE))}")
    if spec.get("internalTrafficPolicy", "Cluster") != "Cluster":
        raise ManifestError(f"{where}: spec.internalTrafficPolicy {spec['internalTrafficPolicy']!r} is not "
                            "supported: service traffic goes to any ready backend; use Cluster or leave it out")
    service_families(spec, where)
    ips = spec.get("clusterIPs")
    if ips and ips[0] != spec.get("clusterIP", ips[0]):
        raise ManifestError(f"{where}: spec.clusterIPs {ips} must start with spec.clusterIP "
                            f"{spec.get('clusterIP')!r}")
    for i, p in enumerate(spec.get("ports") or []):
        if not isinstance(p, dict):
            raise ManifestError(f"{where}: spec.ports[{i}] must be a mapping with port")
        bad = sorted(set(p) - PORT_DONE - set(PORT_IGNORED))
        if bad:
            raise ManifestError(f"{where}: unknown field(s) spec.ports[{i}].{', '.join(bad)}; a port has "
                                f"{', '.join(sorted(PORT_DONE | set(PORT_IGNORED)))}")
        for field, why in PORT_IGNORED.items():
            if field in p:
                warn(f"{where}: spec.ports[{i}].{field} is ignored ({why})")


def k8s_service(doc: dict[str, Any], warn: Callable[[str], None] = lambda _m: None) -> Service:
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    name = meta.get("name")
    typ = spec.get("type", "ClusterIP")
    if typ not in ("ClusterIP", "NodePort"):
        raise ManifestError(f"Service {name}: type {typ!r} is not supported (ClusterIP, NodePort)")
    _service_fields(name, spec, warn)
    ports = [ServicePort(name=p.get("name"), protocol=p.get("protocol", "TCP"), port=p.get("port"),
                         target_port=p.get("targetPort"), node_port=p.get("nodePort")) for p in spec.get("ports") or []]
    timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds", 10800)
    cluster_ip = spec.get("clusterIP") or (spec.get("clusterIPs") or [None])[0]
    families = service_families(spec, name)
    fields: dict[str, Any] = {
        "name": name, "namespace": meta.get("namespace", "default"), "labels": meta.get("labels") or {},
        "ports": ports, "selector": spec.get("selector"), "type": typ,
        "session_affinity": spec.get("sessionAffinity", "None"), "affinity_timeout": timeout,
        "headless": cluster_ip == "None",
        "external_traffic_policy": spec.get("externalTrafficPolicy", "Cluster"),
        "ip_families": families,
        "cluster_ips": [ip for ip in spec.get("clusterIPs") or [] if ip not in ("", "None")],
    }
    if cluster_ip not in (None, "", "None"):
        fields["cluster_ip"] = cluster_ip  # absent: the server assigns (or keeps) one
    return Service(**fields)


def parse(text: str, warn: Callable[[str], None] = lambda _m: None) -> list[Obj]:
    """Every document as an object; `warn` hears about fields accepted but not used."""
    return [to_object(d, i, warn) for i, d in enumerate(load_documents(text))]


def service_families(spec: dict[str, Any], where: str) -> list[str]:
    """A Service's ipFamilies as Tether takes them: given, or from ipFamilyPolicy (dual stack asks for
    both, IPv4 first); refused when they name anything else or contradict the policy."""
    policy = spec.get("ipFamilyPolicy", "SingleStack")
    if policy not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
        raise ManifestError(f"{where}: spec.ipFamilyPolicy {policy!r}: use SingleStack, PreferDualStack or "
                            "RequireDualStack")
    families = spec.get("ipFamilies") or (["IPv4"] if policy == "SingleStack" else ["IPv4", "IPv6"])
    if (not isinstance(families, list) or not 1 <= len(families) <= 2 or len(set(families)) != len(families)
            or any(f not in ("IPv4", "IPv6") for f in families)):
        raise ManifestError(f"{where}: spec.ipFamilies {families!r}: give IPv4, IPv6 or both, once each")
    if policy == "SingleStack" and len(families) != 1:
        raise ManifestError(f"{where}: spec.ipFamilies {families} with ipFamilyPolicy SingleStack: give one "
                            "family, or a dual-stack policy")
    return families
