"""Kubernetes NetworkPolicy manifests go through the API unchanged; invalid ones get Kubernetes' error."""

from __future__ import annotations

from tether.manifests import parse

MANIFEST = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: x
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
    - namespaceSelector: {matchLabels: {project: myproject}}
    - podSelector: {matchLabels: {role: frontend}}
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
"""


def test_kubernetes_manifest_is_stored_unchanged_and_invalid_one_gets_the_kubernetes_error(server) -> None:
    http = server.http()
    assert http.put("/api/v1/namespaces/x", json={"name": "x"}).status_code == 201
    (pol,) = parse(MANIFEST)
    stored = server.client().apply(pol)
    assert stored.spec == parse(MANIFEST)[0].spec
    bad = pol.model_dump(mode="json", exclude={"revision"})
    bad["spec"]["ingress"][0]["ports"][0]["protocol"] = "ICMP"
    r = http.put("/api/v1/namespaces/x/networkpolicies/test-network-policy", json=bad)
    assert r.status_code == 422
    assert r.json()["detail"] == ('NetworkPolicy.networking.k8s.io "test-network-policy" is invalid: '
                                  'spec.ingress[0].ports[0].protocol: Unsupported value: "ICMP": supported values: '
                                  '"SCTP", "TCP", "UDP"')
