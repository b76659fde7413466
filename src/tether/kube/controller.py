"""`tether kube`: mirror a Kubernetes cluster's network objects into Tether.

One informer thread per kind (Namespaces, Pods, NetworkPolicies, Services, EndpointSlices, Nodes)
lists, then watches from the list's resourceVersion with bookmarks; a `410 Gone` (the apiserver's
etcd compacted past it) relists. A thread watches Tether's own stream, because a pod's endpoint is
made by CNI (kubelet passes no labels) and must get its pod's labels when it appears. The
reconciler compares the whole cached Kubernetes state with Tether's objects and writes only the
differences (tether.kube.translate.plan), so a relist, a restart or a second event for the same
change writes nothing twice, and a change made while the controller was away is found on relist.
Only the holder of a coordination.k8s.io Lease reconciles; the others wait to take it over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tether.client import ApiError, TetherClient
from tether.kube import translate
from tether.model import Service

log = logging.getLogger("tether.kube")

WATCH_TIMEOUT = 240  # seconds a watch request lasts before it is made again from the last version


def kube_api(kubeconfig: str | None):
    """An ApiClient from a kubeconfig file, or from the pod's service account inside a cluster."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()


def listers(api) -> dict[str, tuple[Any, Any]]:
    """kind -> (list function, the same for watches) of the official client."""
    from kubernetes import client

    core, net, disc = client.CoreV1Api(api), client.NetworkingV1Api(api), client.DiscoveryV1Api(api)
    return {
        "Namespace": core.list_namespace,
        "Pod": core.list_pod_for_all_namespaces,
        "NetworkPolicy": net.list_network_policy_for_all_namespaces,
        "Service": core.list_service_for_all_namespaces,
        "EndpointSlice": disc.list_endpoint_slice_for_all_namespaces,
        "Node": core.list_node,
    }


def _raw_watch_class():
    from kubernetes import watch

    class Raw(watch.Watch):
        """Events as the apiserver's JSON: the controller reads only `raw_object`, and turning every
        Pod into the client's model objects costs milliseconds per event."""

        def get_return_type(self, func):  # noqa: ANN001 - the client's signature
            return None

    return Raw


def RawWatch():  # noqa: N802 - reads as the class it makes
    return _raw_watch_class()()


class Informer(threading.Thread):
    """List + watch one kind into `cache[kind]`, calling `changed()` after each change."""

    def __init__(self, kind: str, fn: Any, ctl: Controller) -> None:
        super().__init__(name=f"informer-{kind}", daemon=True)
        self.kind, self.fn, self.ctl = kind, fn, ctl
        self.rv = ""
        self.synced = threading.Event()
        self.watch = None

    def relist(self) -> None:
        r = self.fn(_preload_content=False, _request_timeout=30)
        body = json.loads(r.data)
        items = {translate.key(o): o for o in body.get("items") or []}
        with self.ctl.lock:
            self.ctl.cache[self.kind] = items
        self.rv = body["metadata"]["resourceVersion"]
        self.ctl.stats["lists"][self.kind] += 1
        self.synced.set()
        self.ctl.changed()

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        need_list = True
        while not self.ctl.stopping.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                self.watch = RawWatch()
                for ev in self.watch.stream(self.fn, resource_version=self.rv, allow_watch_bookmarks=True,
                                            timeout_seconds=WATCH_TIMEOUT, _request_timeout=WATCH_TIMEOUT + 30):
                    obj = ev["raw_object"]
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if ev["type"] == "BOOKMARK":
                        self.ctl.stats["bookmarks"][self.kind] += 1
                    else:
                        k = translate.key(obj)
                        with self.ctl.lock:
                            if ev["type"] == "DELETED":
                                self.ctl.cache[self.kind].pop(k, None)
                            else:
                                self.ctl.cache[self.kind][k] = obj
                        self.ctl.stats["events"][self.kind] += 1
                        self.ctl.changed()
                    if rv:
                        self.rv = rv
                    if self.ctl.stopping.is_set():
                        break
            except ApiException as e:
                if e.status == 410:
                    log.info("%s watch expired (410 Gone at %s): relisting", self.kind, self.rv)
                    self.ctl.stats["gone"][self.kind] += 1
                    need_list = True
                else:
                    log.warning("%s watch failed (%s %s); retrying from %s", self.kind, e.status, e.reason, self.rv)
                    self.ctl.stopping.wait(1)
            except Exception as e:  # noqa: BLE001 - the apiserver restarts, a connection drops: watch again
                log.warning("%s watch broke (%s); watching again from %s", self.kind, e, self.rv or "a new list")
                if not self.rv:
                    need_list = True
                self.ctl.stopping.wait(1)


class LeaderLease:
    """Leader election through a coordination.k8s.io/v1 Lease, as Kubernetes' own controllers do."""

    def __init__(self, api, namespace: str, name: str, identity: str, duration: int = 10) -> None:
        from kubernetes import client

        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity, self.duration = namespace, name, identity, duration
        self.renewed = 0.0

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def try_acquire(self) -> bool:
        """Take or renew the lease; True while this process holds it."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        now = self._now()
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=client.V1LeaseSpec(holder_identity=self.identity,
                                                          lease_duration_seconds=self.duration, acquire_time=now,
                                                          renew_time=now, lease_transitions=0))
            return self._write(lambda: self.coord.create_namespaced_lease(self.namespace, body))
        spec = lease.spec
        mine = spec.holder_identity == self.identity
        renew = spec.renew_time or spec.acquire_time
        expired = renew is None or renew + timedelta(seconds=spec.lease_duration_seconds or self.duration) < now
        if not mine and not expired:
            return False
        if not mine:
            spec.holder_identity = self.identity
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.renew_time = now
        spec.lease_duration_seconds = self.duration
        # the lease's resourceVersion makes the replace fail (409) if another controller wrote first
        return self._write(lambda: self.coord.replace_namespaced_lease(self.name, self.namespace, lease))

    def _write(self, write: Callable[[], object]) -> bool:
        """Create or replace the lease: True when it is ours now, False when another controller won."""
        from kubernetes.client.exceptions import ApiException

        try:
            write()
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        self.renewed = time.monotonic()
        return True


class Controller:
    def __init__(self, api, tether: TetherClient, stats_file: str | None = None, debounce: float = 0.02,
                 watch_client: TetherClient | None = None) -> None:
        self.api, self.tether, self.stats_file, self.debounce = api, tether, stats_file, debounce
        self.watch_client = watch_client or tether  # its own connection: the watch holds one open
        self.cache: dict[str, dict[str, dict]] = {k: {} for k in translate.KINDS}
        self.lock = threading.Lock()
        self.dirty = threading.Event()
        self.stopping = threading.Event()
        self.stats: dict[str, Any] = {"lists": Counter(), "events": Counter(), "bookmarks": Counter(),
                                      "gone": Counter(), "writes": Counter(), "reconciles": 0, "failed": 0}
        self.written: list[str] = []  # one line per write, for tests that count them
        self.has_field = set(Service.model_fields)
        self.seen_nodes: set[str] = set()
        self.informers = [Informer(k, fn, self) for k, fn in listers(api).items()]

    def changed(self) -> None:
        self.dirty.set()

    def start(self) -> None:
        for i in self.informers:
            i.start()
        threading.Thread(target=self._watch_tether, name="tether-watch", daemon=True).start()

    def wait_synced(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i in self.informers:
            if not i.synced.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"listing {i.kind} from the apiserver did not succeed within {timeout:g} s; "
                                   "check --kubeconfig and that the apiserver answers")

    def _watch_tether(self) -> None:
        """New and changed endpoints and hosts (made by agents and CNI) need the pods' labels. From
        revision 0, the server answers `resync` with its head when that is far behind."""
        rev = 0
        while not self.stopping.is_set():
            try:
                with self.watch_client.http.stream("GET", "/api/v1/watch", params={"after_revision": rev},
                                             timeout=httpx.Timeout(10, read=60)) as r:
                    for line in r.iter_lines():
                        if not line:
                            continue
                        ev = json.loads(line)
                        if ev.get("type") == "resync":
                            rev = int(ev.get("revision") or ev.get("compact_revision") or rev)
                            break
                        rev = int(ev.get("revision") or rev)
                        if ev.get("kind") in ("Endpoint", "Host"):
                            self.changed()
                self.changed()
            except Exception as e:  # noqa: BLE001 - the server restarts: watch again
                log.warning("watching Tether failed (%s); again in 1 s", e)
                self.stopping.wait(1)
                self.changed()

    def tether_state(self) -> dict[str, list]:
        return {k: self.tether.list(k) for k in ("Namespace", "NetworkPolicy", "Service", "Endpoint", "Host")}

    def reconcile_once(self) -> int:
        """One comparison and its writes; returns how many writes it made."""
        with self.lock:
            kube = {k: dict(v) for k, v in self.cache.items()}
        self.seen_nodes |= set(kube["Node"])
        p = translate.plan(kube, self.tether_state(), self.has_field, self.seen_nodes)
        n = 0
        ordered = ([d for d in p.delete if d[0] != "Namespace"], p.apply, [d for d in p.delete if d[0] == "Namespace"])
        for kind, name in ordered[0]:
            n += self._write(f"delete {kind} {name}", lambda k=kind, s=name: self.tether.delete(k, s))
        for obj in ordered[1]:
            n += self._write(f"apply {obj.kind} {obj.store_name()}", lambda o=obj: self.tether.apply(o))
        for kind, name in ordered[2]:
            n += self._write(f"delete {kind} {name}", lambda k=kind, s=name: self.tether.delete(k, s))
        for ch in p.endpoints:
            n += self._write(f"patch Endpoint {ch.endpoint_id} {sorted(ch.changes)}",
                             lambda c=ch: self.tether.request("PATCH", f"/api/v1/endpoints/{c.endpoint_id}",
                                                              content=json.dumps(c.changes)))
        for host in p.delete_hosts:
            n += self._reclaim_host(host)
        self.stats["reconciles"] += 1
        self._save_stats()
        return n

    def _write(self, what: str, fn: Any) -> int:
        try:
            fn()
        except ApiError as e:
            if e.status == 404 and what.startswith("delete"):
                return 0
            self.stats["failed"] += 1
            log.warning("%s failed: %s", what, e.detail)
            return 0
        self.stats["writes"][what.split()[1]] += 1
        self.written.append(what)
        log.info("%s", what)
        return 1

    def _reclaim_host(self, host: str) -> int:
        """A deleted Node: its endpoints go (their addresses return to IPAM), then the host (its VTEP)."""
        n = 0
        for ep in self.tether.list("Endpoint", host=host):
            if ep.host == host:
                n += self._write(f"delete Endpoint {ep.id} (node {host} deleted)",
                                 lambda i=ep.id: self.tether.delete("Endpoint", i))
        n += self._write(f"delete Host {host}", lambda: self.tether.delete("Host", host))
        self.seen_nodes.discard(host)
        return n

    def _save_stats(self) -> None:
        if not self.stats_file:
            return
        out = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.stats.items()}
        out["written"] = self.written
        tmp = self.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, self.stats_file)

    def run(self, lease: LeaderLease | None) -> None:
        """Reconcile while holding the lease (renewed every third of its duration)."""
        self.start()
        self.wait_synced()
        log.info("listed every kind; reconciling")
        next_renew = 0.0
        self.dirty.set()
        while not self.stopping.is_set():
            if lease is not None and time.monotonic() >= next_renew:
                if not lease.try_acquire():
                    if lease.renewed and time.monotonic() - lease.renewed > lease.duration:
                        log.warning("lost the leader lease; stopping")
                        return
                    self.stopping.wait(1)
                    continue
                next_renew = time.monotonic() + lease.duration / 3
            if not self.dirty.wait(1):
                continue
            time.sleep(self.debounce)  # a burst of events makes one pass
            self.dirty.clear()
            try:
                self.reconcile_once()
            except Exception as e:  # noqa: BLE001 - Tether or the apiserver away: try again
                log.warning("reconcile failed (%s); again in 1 s", e)
                self.stats["failed"] += 1
                self.stopping.wait(1)
                self.dirty.set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="tether kube",
        description="Mirror a Kubernetes cluster's Namespaces, Pods (labels, named ports), NetworkPolicies, "
                    "Services with their EndpointSlices, and Nodes into Tether. Run one or more; a "
                    "coordination.k8s.io Lease elects the one that writes.")
    p.add_argument("--kubeconfig", help="kubeconfig of the cluster (default: the in-cluster service account)")
    p.add_argument("--server", default=os.environ.get("TETHER_SERVER", "unix:///run/tether/server.sock"),
                   help="Tether server URL (http://host:port or unix:///path)")
    p.add_argument("--token-file", help="file holding Tether's API token")
    p.add_argument("--lease-namespace", default="kube-system", help="namespace of the leader Lease")
    p.add_argument("--lease-name", default="tether-kube", help="name of the leader Lease")
    p.add_argument("--lease-duration", type=int, default=10, help="seconds a leader's lease lasts unrenewed")
    p.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="this process's name in the Lease")
    p.add_argument("--no-leader-election", action="store_true", help="write without holding the Lease")
    p.add_argument("--stats-file", help="write counts of lists, events, 410s and writes here (JSON)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.kubeconfig:  # a kubeconfig that skips verification says so itself; one warning per request is noise
        import warnings

        warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = None
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip()
    api = kube_api(a.kubeconfig)
    ctl = Controller(api, TetherClient(a.server, token), a.stats_file, watch_client=TetherClient(a.server, token))
    lease = None if a.no_leader_election else LeaderLease(api, a.lease_namespace, a.lease_name, a.identity,
                                                          a.lease_duration)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stopping.set())
    with contextlib.suppress(KeyboardInterrupt):
        ctl.run(lease)
    sys.exit(0)


if __name__ == "__main__":
    main()
