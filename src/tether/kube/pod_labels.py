"""A pod's labels and named ports from the apiserver at CNI ADD, so policies select a new pod from
its first packet (kubelet passes no labels to CNI). Used by the agent's CNI server when the
network's CNI config names a kubeconfig: `"kubernetes": {"kubeconfig": "/etc/tether/kubeconfig"}`.
`tether kube` sets the same labels a moment later in any case; this only closes that gap."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from tether.kube.translate import pod_ports
from tether.model import PortDecl

log = logging.getLogger("tether.kube")


@functools.lru_cache(maxsize=4)
def _core(kubeconfig: str):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))


def pod_labels(kubeconfig: str, namespace: str, name: str, timeout: float = 2.0) -> tuple[dict[str, str],
                                                                                           list[PortDecl]] | None:
    """The pod's labels and named ports, or None (logged) when the apiserver cannot say in time."""
    try:
        r = _core(kubeconfig).read_namespaced_pod(name, namespace, _preload_content=False, _request_timeout=timeout)
        pod: dict[str, Any] = json.loads(r.data)
    except Exception as e:  # noqa: BLE001 - the controller sets them later; the pod must still start
        log.warning("could not read pod %s/%s from the apiserver (%s); its labels follow from tether kube",
                    namespace, name, e)
        return None
    return dict((pod.get("metadata") or {}).get("labels") or {}), pod_ports(pod)
