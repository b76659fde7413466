"""Invalid NetworkPolicies are refused with the message the Kubernetes API server gives."""

from __future__ import annotations

import pytest

from tether.calc.k8s_validation import PolicyInvalid, check_policy, validate_network_policy


@pytest.mark.parametrize(("spec", "message"), [
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     'spec.ingress[0].ports[0].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"'),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
     "spec.ingress[0].ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.egress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is non-numeric"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.egress[0].ports[0].endPort: Invalid value: 80: must be greater than or equal to `port`"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]: Required value: must specify a peer"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]: Forbidden: may not specify both ipBlock and another peer"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]},
     'spec.ingress[0].from[0].ipBlock.except[0]: Invalid value: "11.0.0.0/8": must be a strict subset of `cidr`'),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]},
     'spec.ingress[0].from[0].ipBlock.cidr: Invalid value: "10.0.0.300/8": must be a valid CIDR value, '
     "(e.g. 10.9.8.0/24 or 2001:db8::/64)"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or "
     "'NotIn'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}},
     'spec.podSelector.matchExpressions[0].operator: Invalid value: "Maybe": not a valid selector operator'),
    ({"podSelector": {}, "policyTypes": ["Inbound"]},
     'spec.policyTypes[0]: Unsupported value: "Inbound": supported values: "Egress", "Ingress"'),
    ({"podSelector": {}, "ingress": [{"form": []}]}, 'unknown field "spec.ingress[0].form"'),
])
def test_kubernetes_error_messages(spec: dict, message: str) -> None:
    assert message in validate_network_policy(spec)


def test_the_whole_message_names_the_object_like_kubectl() -> None:
    with pytest.raises(PolicyInvalid) as e:
        check_policy("web", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})
    assert str(e.value) == ('NetworkPolicy.networking.k8s.io "web" is invalid: spec.ingress[0].ports[0].port: '
                            "Invalid value: 0: must be between 1 and 65535, inclusive")


def test_upstream_example_policies_are_valid() -> None:
    spec = {"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                                  {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                                  {"podSelector": {"matchLabels": {"role": "frontend"}}}],
                         "ports": [{"protocol": "TCP", "port": 6379}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "ports": [{"protocol": "TCP", "port": 5978}]},
                       {"ports": [{"port": 32000, "endPort": 32768}]}]}
    assert validate_network_policy(spec, "test-network-policy") == []
