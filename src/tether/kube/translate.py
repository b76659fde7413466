"""Kubernetes objects (as the apiserver serves them: camelCase JSON dicts) -> Tether's desired state.

Pure calculation, unit-tested: the controller (tether.kube.controller) feeds it the objects it
watches and writes only the differences it returns, so a relist after a restart or a `410 Gone`
writes nothing that is already in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.model import Endpoint, Namespace, NetworkPolicy, PortDecl, Service, ServiceBackend, ServicePort

# Marks the namespaces, policies and services the controller owns, so it deletes only its own
# objects (a Tether object made through Tether's own API is never touched) and finds the ones whose
# Kubernetes object was deleted while it was not watching.
SOURCE_LABEL = "tether.dev/source"
SOURCE = "kubernetes"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

KINDS = ("Namespace", "Pod", "NetworkPolicy", "Service", "EndpointSlice", "Node")


def key(obj: dict[str, Any]) -> str:
    """`namespace/name` or `name`: how the controller's cache keys a Kubernetes object."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else meta["name"]


def owned(labels: dict[str, str]) -> bool:
    return labels.get(SOURCE_LABEL) == SOURCE


def namespace_of(ns: dict[str, Any]) -> Namespace:
    meta = ns["metadata"]
    return Namespace(name=meta["name"], labels={**(meta.get("labels") or {}), SOURCE_LABEL: SOURCE})


def policy_of(pol: dict[str, Any]) -> NetworkPolicy:
    meta = pol["metadata"]
    return NetworkPolicy(name=meta["name"], namespace=meta.get("namespace") or "default",
                         spec=pol.get("spec") or {}, labels={SOURCE_LABEL: SOURCE})


def pod_ports(pod: dict[str, Any]) -> list[PortDecl]:
    """The pod's named container ports (what NetworkPolicy's and Services' named ports resolve to)."""
    out = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name"):
                out.append(PortDecl(name=p["name"], port=p["containerPort"], protocol=p.get("protocol") or "TCP"))
    return out


@dataclass
class EndpointChange:
    """What an endpoint must get from its pod: labels and declared ports (a PATCH)."""

    endpoint_id: str
    changes: dict[str, Any]


def endpoint_changes(pods: dict[str, dict[str, Any]], endpoints: list[Endpoint]) -> list[EndpointChange]:
    """Pods are matched to endpoints by the K8S_POD_NAMESPACE/K8S_POD_NAME kubelet passes to CNI
    (the endpoint's namespace and name); only a differing endpoint gets a change."""
    out = []
    for ep in endpoints:
        pod = pods.get(f"{ep.namespace}/{ep.name}")
        if pod is None or ep.owner.type != "cni":
            continue
        labels = dict((pod.get("metadata") or {}).get("labels") or {})
        ports = [p.model_dump() for p in pod_ports(pod)]
        changes: dict[str, Any] = {}
        if ep.labels != labels:
            changes["labels"] = labels
        if [p.model_dump() for p in ep.ports] != ports:
            changes["ports"] = ports
        if changes:
            out.append(EndpointChange(ep.id, changes))
    return out


def service_of(svc: dict[str, Any], slices: list[dict[str, Any]], has_field: set[str]) -> Service | None:
    """A Service with its backends from its EndpointSlices (ready addresses only); None for the
    kinds Tether does not program (ExternalName, LoadBalancer's extras are left to the cloud)."""
    meta, spec = svc["metadata"], svc.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    if kind not in ("ClusterIP", "NodePort"):
        return None
    cluster_ip = spec.get("clusterIP")
    headless = cluster_ip in (None, "", "None")
    # a named target port resolves per backend; the slice says to what number
    resolved: dict[str, int] = {}
    backends: list[str] = []
    for sl in slices:
        if sl.get("addressType", "IPv4") != "IPv4":
            continue
        for p in sl.get("ports") or []:
            if p.get("port") is not None:
                resolved[p.get("name") or ""] = p["port"]
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            backends.extend(ep.get("addresses") or [])
    ports = []
    for p in spec.get("ports") or []:
        target = resolved.get(p.get("name") or "", p.get("targetPort"))
        ports.append(ServicePort(name=p.get("name"), protocol=p.get("protocol") or "TCP", port=p["port"],
                                 target_port=target, node_port=p.get("nodePort") if kind == "NodePort" else None))
    data: dict[str, Any] = dict(
        name=meta["name"], namespace=meta.get("namespace") or "default", ports=ports, type=kind,
        cluster_ip=None if headless else cluster_ip, labels={SOURCE_LABEL: SOURCE},
        backends=[ServiceBackend(ip=ip) for ip in sorted(set(backends))],
        session_affinity=spec.get("sessionAffinity") or "None",
    )
    timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
    if timeout:
        data["affinity_timeout"] = timeout
    if "headless" in has_field and headless:
        data["headless"] = True
    if "external_traffic_policy" in has_field and kind == "NodePort" and spec.get("externalTrafficPolicy"):
        data["external_traffic_policy"] = spec["externalTrafficPolicy"]
    if headless and "headless" not in has_field:
        return None  # this Tether has no DNS-only services
    return Service(**data)


def slices_by_service(slices: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for sl in slices.values():
        meta = sl.get("metadata") or {}
        svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc:
            out.setdefault(f"{meta.get('namespace')}/{svc}", []).append(sl)
    return out


def same(a: Any, b: Any, fields: tuple[str, ...]) -> bool:
    """Equal on the fields the controller owns (ids, revisions and server-filled fields aside)."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return all(da.get(f) == db.get(f) for f in fields)


NAMESPACE_FIELDS = ("labels",)
POLICY_FIELDS = ("labels", "spec")
SERVICE_FIELDS = ("labels", "ports", "type", "backends", "session_affinity", "affinity_timeout", "headless",
                  "external_traffic_policy", "selector")


@dataclass
class Plan:
    """The writes that bring Tether to the Kubernetes state: applies, then deletes."""

    apply: list[Any] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, store name)
    endpoints: list[EndpointChange] = field(default_factory=list)
    delete_hosts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.apply) + len(self.delete) + len(self.endpoints) + len(self.delete_hosts)


def plan(kube: dict[str, dict[str, dict[str, Any]]], tether: dict[str, list[Any]], has_field: set[str],
         known_nodes: set[str]) -> Plan:
    """Compare the watched Kubernetes objects (`kube[kind][key]`) with Tether's (`tether[kind]`).

    A host that mirrors a Node carries the Node's labels and the source mark; once its Node is gone
    (or it is in `known_nodes`, the Nodes seen this run), its endpoints are deleted and so is the
    host, which returns its addresses to the pool. Other hosts are Tether's own and left alone."""
    out = Plan()
    have_ns = {n.name: n for n in tether["Namespace"]}
    for ns in kube["Namespace"].values():
        want = namespace_of(ns)
        old = have_ns.get(want.name)
        if old is None or not same(old, want, NAMESPACE_FIELDS):
            if old is not None:
                want.id, want.created_at = old.id, old.created_at
            out.apply.append(want)
    want_ns = {namespace_of(ns).name for ns in kube["Namespace"].values()}
    # policies before services before namespaces: a namespace goes last, once it is empty
    have_pol = {f"{p.namespace}/{p.name}": p for p in tether["NetworkPolicy"]}
    for k, pol in kube["NetworkPolicy"].items():
        want = policy_of(pol)
        old = have_pol.get(k)
        if old is None or not same(old, want, POLICY_FIELDS):
            if old is not None:
                want.id, want.created_at = old.id, old.created_at
            out.apply.append(want)
    for k, p in have_pol.items():
        if owned(p.labels) and k not in kube["NetworkPolicy"]:
            out.delete.append(("NetworkPolicy", k))
    have_svc = {f"{s.namespace}/{s.name}": s for s in tether["Service"]}
    slices = slices_by_service(kube["EndpointSlice"])
    wanted_svc = set()
    for k, svc in kube["Service"].items():
        want = service_of(svc, slices.get(k, []), has_field)
        if want is None:
            continue
        wanted_svc.add(k)
        old = have_svc.get(k)
        moved = want.cluster_ip is not None and old is not None and old.cluster_ip != want.cluster_ip
        if old is None or moved or not same(old, want, SERVICE_FIELDS):
            if old is not None:
                want.id, want.created_at = old.id, old.created_at
                if old.cluster_ip != want.cluster_ip:
                    out.delete.append(("Service", k))  # a service's address cannot change in place
            out.apply.append(want)
    for k, s in have_svc.items():
        if owned(s.labels) and k not in wanted_svc:
            out.delete.append(("Service", k))
    for name, n in have_ns.items():
        if owned(n.labels) and name not in want_ns:
            out.delete.append(("Namespace", name))
    out.endpoints = endpoint_changes(kube["Pod"], tether["Endpoint"])
    for h in tether["Host"]:
        node = kube["Node"].get(h.name)
        if node is not None:
            labels = {**((node.get("metadata") or {}).get("labels") or {}), SOURCE_LABEL: SOURCE}
            if h.labels != labels:
                out.apply.append(h.model_copy(update={"labels": labels}))
        elif owned(h.labels) or h.name in known_nodes:
            out.delete_hosts.append(h.name)
    return out
