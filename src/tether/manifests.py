"""YAML/JSON documents -> Tether objects: Tether kinds and unchanged Kubernetes manifests.

Tether documents look like Kubernetes ones: `apiVersion: tether.dev/v1`, `kind`, `metadata`
(name, namespace, labels) and `spec` (the object's fields). Kubernetes `Namespace` (v1),
`NetworkPolicy` (networking.k8s.io/v1) and `Service` (v1) are accepted as they are.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from tether.model import KINDS, Namespace, NetworkPolicy, Obj, Service, ServicePort

TETHER_API = "tether.dev/v1"
K8S_KINDS = {("v1", "Namespace"), ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Service")}


class ManifestError(ValueError):
    pass


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


def to_object(doc: dict[str, Any], index: int = 0) -> Obj:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata") or {}
    where = f"document {index + 1} ({kind or '?'} {meta.get('name', '?')})"
    if not kind or not api:
        raise ManifestError(f"{where}: apiVersion and kind are required")
    try:
        if api == TETHER_API:
            if kind not in KINDS:
                raise ManifestError(f"{where}: unknown kind {kind!r}; Tether kinds: {', '.join(sorted(KINDS))}")
            cls = KINDS[kind]
            data = dict(doc.get("spec") or {})
            data["name"] = meta.get("name")
            if meta.get("labels"):
                data["labels"] = meta["labels"]
            if cls.namespaced or kind == "Endpoint":
                data["namespace"] = meta.get("namespace", data.get("namespace", "default"))
            for k in ("id",):
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
        return k8s_service(doc)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ManifestError(f"{where}: {msgs}") from None


def k8s_service(doc: dict[str, Any]) -> Service:
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    typ = spec.get("type", "ClusterIP")
    if typ not in ("ClusterIP", "NodePort"):
        raise ManifestError(f"Service {meta.get('name')}: type {typ!r} is not supported (ClusterIP, NodePort)")
    ports = [ServicePort(name=p.get("name"), protocol=p.get("protocol", "TCP"), port=p["port"],
                         target_port=p.get("targetPort"), node_port=p.get("nodePort")) for p in spec.get("ports") or []]
    timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds", 10800)
    cluster_ip = spec.get("clusterIP")
    families = spec.get("ipFamilies") or (["IPv4", "IPv6"] if spec.get("ipFamilyPolicy") == "RequireDualStack"
                                          else ["IPv4"])
    return Service(name=meta.get("name"), namespace=meta.get("namespace", "default"), labels=meta.get("labels") or {},
                   ports=ports, selector=spec.get("selector"), type=typ,
                   cluster_ip=None if cluster_ip in (None, "", "None") else cluster_ip,
                   cluster_ips=[ip for ip in spec.get("clusterIPs") or [] if ip not in ("", "None")],
                   ip_families=families,
                   session_affinity=spec.get("sessionAffinity", "None"), affinity_timeout=timeout)


def parse(text: str) -> list[Obj]:
    return [to_object(d, i) for i, d in enumerate(load_documents(text))]
