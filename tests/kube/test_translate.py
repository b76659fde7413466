"""The controller's calculation: Kubernetes objects -> the Tether writes that make them true."""

from tether.kube import translate
from tether.kube.translate import SOURCE, SOURCE_LABEL, plan
from tether.model import Endpoint, Host, Namespace, NetworkPolicy, Owner, Service

HAS = set(Service.model_fields)


def empty_kube() -> dict:
    return {k: {} for k in translate.KINDS}


def empty_tether() -> dict:
    return {k: [] for k in ("Namespace", "NetworkPolicy", "Service", "Endpoint", "Host")}


def pod(ns: str, name: str, labels: dict, ports: list | None = None) -> dict:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "ports": ports or []}]}}


def test_pod_labels_and_named_ports_go_onto_the_endpoint_cni_made_for_it():
    k = empty_kube()
    k["Pod"]["prod/web"] = pod("prod", "web", {"app": "web"}, [{"name": "http", "containerPort": 8080}])
    ep = Endpoint(name="web", namespace="prod", network="n", owner=Owner(type="cni", container_id="c1"))
    other = Endpoint(name="db", namespace="prod", network="n", owner=Owner(type="cni", container_id="c2"))
    t = empty_tether()
    t["Endpoint"] = [ep, other]
    p = plan(k, t, HAS, set())
    assert [(c.endpoint_id, c.changes) for c in p.endpoints] == [
        (ep.id, {"labels": {"app": "web"}, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})]


def test_a_relist_of_what_is_already_in_tether_plans_no_write():
    k = empty_kube()
    k["Namespace"]["prod"] = {"metadata": {"name": "prod", "labels": {"team": "a"}}}
    k["NetworkPolicy"]["prod/deny"] = {"metadata": {"namespace": "prod", "name": "deny"},
                                       "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    k["Pod"]["prod/web"] = pod("prod", "web", {"app": "web"})
    t = empty_tether()
    p = plan(k, t, HAS, set())
    assert len(p) == 2 and not p.endpoints
    t["Namespace"] = [o for o in p.apply if isinstance(o, Namespace)]
    t["NetworkPolicy"] = [o for o in p.apply if isinstance(o, NetworkPolicy)]
    t["Endpoint"] = [Endpoint(name="web", namespace="prod", network="n", labels={"app": "web"},
                              owner=Owner(type="cni", container_id="c"))]
    assert len(plan(k, t, HAS, set())) == 0


def test_only_owned_objects_are_deleted_when_their_kubernetes_object_is_gone():
    t = empty_tether()
    t["NetworkPolicy"] = [NetworkPolicy(name="mine", namespace="a", labels={SOURCE_LABEL: SOURCE}),
                          NetworkPolicy(name="tethers", namespace="a")]
    t["Namespace"] = [Namespace(name="a", labels={SOURCE_LABEL: SOURCE}), Namespace(name="own")]
    p = plan(empty_kube(), t, HAS, set())
    assert p.delete == [("NetworkPolicy", "a/mine"), ("Namespace", "a")]


def test_service_backends_come_from_ready_endpointslice_addresses_and_named_ports_resolve():
    k = empty_kube()
    k["Service"]["a/web"] = {"metadata": {"namespace": "a", "name": "web"},
                             "spec": {"clusterIP": "10.96.0.10", "type": "ClusterIP",
                                      "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}
    k["EndpointSlice"]["a/web-1"] = {
        "metadata": {"namespace": "a", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.1.0.2"], "conditions": {"ready": True}},
                      {"addresses": ["10.1.0.3"], "conditions": {"ready": False}},
                      {"addresses": ["10.1.0.4"]}]}
    [svc] = plan(k, empty_tether(), HAS, set()).apply
    assert svc.cluster_ip == "10.96.0.10"
    assert [b.ip for b in svc.backends] == ["10.1.0.2", "10.1.0.4"]
    assert svc.ports[0].target_port == 8080


def test_a_deleted_node_reclaims_its_host_and_other_hosts_are_left_alone():
    t = empty_tether()
    t["Host"] = [Host(name="n1", underlay_ip="198.18.0.1", labels={SOURCE_LABEL: SOURCE}),
                 Host(name="n2", underlay_ip="198.18.0.2")]
    assert plan(empty_kube(), t, HAS, set()).delete_hosts == ["n1"]
    k = empty_kube()
    k["Node"]["n2"] = {"metadata": {"name": "n2", "labels": {"zone": "a"}}}
    p = plan(k, t, HAS, set())
    assert [h.labels for h in p.apply] == [{"zone": "a", SOURCE_LABEL: SOURCE}]


def test_headless_and_local_traffic_services_are_translated_only_where_tether_has_those_fields():
    headless = {"metadata": {"namespace": "a", "name": "db"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}
    assert translate.service_of(headless, [], HAS - {"headless"}) is None
    if "headless" in HAS:  # the Service model with DNS-only services
        svc = translate.service_of(headless, [], HAS)
        assert svc is not None and svc.headless and svc.cluster_ip is None
    local = {"metadata": {"namespace": "a", "name": "np"},
             "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
                      "ports": [{"port": 80, "nodePort": 30080}]}}
    svc = translate.service_of(local, [], HAS)
    assert svc is not None and svc.ports[0].node_port == 30080
    if "external_traffic_policy" in HAS:
        assert svc.external_traffic_policy == "Local"
