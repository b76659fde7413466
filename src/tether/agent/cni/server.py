"""The agent's side of tether-cni: a unix-socket server that runs ADD/DEL/CHECK/STATUS/GC.

ADD creates the endpoint through the server (IPAM happens there, idempotently per
`<container id>/<ifname>` handle) while the pod's veth is made, then gives the pod its addresses and
answers the CNI result. Anything that fails removes the veth and releases the addresses again, so a
failed ADD leaks nothing.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from tether import yielding
from tether.agent import unix_socket
from tether.agent.cni import protocol as cp
from tether.calc import names
from tether.calc.names import POD_GATEWAY, host_ifname
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable
from tether.model import Endpoint, Namespace, Network, Owner, PortDecl, Service, ServiceBackend, ServicePort

if TYPE_CHECKING:
    from tether.agent.local_endpoints import LocalEndpoints
    from tether.dataplane.pods import PodLink

log = logging.getLogger("tether.cni")
T = TypeVar("T")


MAX_ENV = 64 << 10  # the environment frame: CNI_* variables, a few hundred bytes in practice
MAX_STDIN = 1 << 20  # the network configuration (with a prevResult)
READ_DEADLINE = 10.0  # seconds for a client to send its whole request
MAX_CLIENTS = 256  # connections served at once


class FrameTooLarge(ValueError):
    pass


async def read_frame(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    """One length-prefixed frame; a declared length over `limit` is refused before anything is
    allocated for it (a client that declares 1 GiB gets an error, not 1 GiB of buffers)."""
    n = int.from_bytes(await reader.readexactly(4), "big")
    if n > limit:
        raise FrameTooLarge(f"the {what} frame declares {n} bytes, more than the limit of {limit}")
    return await reader.readexactly(n)


DnsConfig = Callable[[Network | None, str | None], dict[str, Any]]  # (network, namespace) -> the CNI result's `dns`


def no_dns(net: Network | None, namespace: str | None) -> dict[str, Any]:
    return {}


def always_ready() -> str | None:
    return None


class CniServer:
    """`not_ready()` says why pods cannot be added yet (None: they can); `dns` is what a pod is
    told about DNS, asked at every ADD (the DNS service may start after this server)."""

    def __init__(self, local: LocalEndpoints, client: AsyncTetherClient, path: str, dns: DnsConfig = no_dns,
                 not_ready: Callable[[], str | None] = always_ready) -> None:
        self.local = local
        self.client = client
        self.dns = dns
        self.not_ready = not_ready
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        # all of this server's netlink work runs on one thread of its own: pyroute2's sockets (DEL,
        # CHECK) belong to the thread that opened them, and the plugging stays off the default
        # executor, where an apply can hold a thread for tens of ms
        self._netlink_thread = ThreadPoolExecutor(1, thread_name_prefix="tether-cni-netlink")

    async def _netlink(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._netlink_thread,
                                                                functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale socket of a previous agent: remove it at once (runtimes wait on it)
        # root only: whoever can connect can plug any namespace into any network
        self.server = await unix_socket.start_server(unix_socket.ConnectionCap(MAX_CLIENTS).wrap(self._serve),
                                                     self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._netlink_thread.shutdown(wait=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_DEADLINE):
                    env_raw = await read_frame(reader, MAX_ENV, "environment")
                    stdin = await read_frame(reader, MAX_STDIN, "network configuration")
                env = dict(item.split("=", 1) for item in env_raw.decode().split("\0") if "=" in item)
            except TimeoutError:
                log.warning("closing a CNI connection that sent no complete request within %g s", READ_DEADLINE)
                return
            except ValueError as e:  # too large, or not UTF-8
                log.warning("bad CNI request frame: %s", e)
                err = cp.CniError(cp.DECODE_FAILURE, f"bad request frame: {e}")
                writer.write((1).to_bytes(4, "big") + cp.error_json(cp.LATEST, err))
                await asyncio.wait_for(writer.drain(), READ_DEADLINE)
                return
            # only now, with the whole request read, do applies step aside until it is answered: a
            # client that connects and sends nothing must not hold them up
            yielding.enter()
            try:
                code, out = await self.handle(env, stdin)
                writer.write(code.to_bytes(4, "big") + out)
                await asyncio.wait_for(writer.drain(), READ_DEADLINE)
            finally:
                yielding.leave()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
            log.warning("bad CNI request frame: %s", e or type(e).__name__)
        finally:
            writer.close()

    async def handle(self, env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
        version = cp.LATEST
        try:
            req = cp.parse_request(env, stdin)
            version = req.version
            handler: dict[str, Callable[[cp.Request], Awaitable[bytes]]] = {
                "ADD": self.add, "DEL": self.delete, "CHECK": self.check, "STATUS": self.status, "GC": self.gc,
                "VERSION": self.version}
            t0 = time.perf_counter()
            out = await handler[req.command](req)
            log.info("CNI %s %s %s: ok in %.1f ms", req.command, req.container_id[:12], req.ifname,
                     (time.perf_counter() - t0) * 1000)
            return 0, out
        except cp.CniError as e:
            log.warning("CNI %s failed: %s", env.get("CNI_COMMAND"), e.msg)
            return 1, cp.error_json(version, e)
        except Exception as e:  # noqa: BLE001 - always answer the runtime
            log.exception("CNI request failed")
            return 1, cp.error_json(version, cp.CniError(cp.IO_FAILURE, f"internal error in the agent: "
                                                                        f"{type(e).__name__}: {e}"))

    async def version(self, req: cp.Request) -> bytes:
        return cp.version_json(req.version)

    # --- ADD --------------------------------------------------------------------------------------

    def _endpoint_for(self, req: cp.Request) -> Endpoint:
        cfg = req.config
        name = req.args.get("K8S_POD_NAME") or names.pod_name(req.container_id)
        namespace = req.args.get("K8S_POD_NAMESPACE") or cfg.get("namespace") or "default"
        labels = dict(cfg.get("labels") or {})
        labels.update((cfg.get("runtimeConfig") or {}).get("labels") or {})
        ports = [PortDecl(name=p["name"], port=p["port"], protocol=p.get("protocol", "TCP").upper())
                 for p in cfg.get("ports") or [] if p.get("name")]
        ips = [ip.split("/")[0] for ip in req.args.get("IP", "").split(",") if ip]
        ips += [ip.split("/")[0] for ip in (cfg.get("runtimeConfig") or {}).get("ips") or []]
        mac = req.args.get("MAC") or (cfg.get("runtimeConfig") or {}).get("mac")
        mac = mac or names.pod_mac(req.container_id, req.ifname)  # known in advance, so anti-spoofing can pin it
        return Endpoint(name=names.dns_label(name, names.pod_name(req.container_id)), network=req.network,
                        host=self.local.host, namespace=names.dns_label(namespace, "default"), ips=ips,
                        mac=mac.lower() if mac else None, labels=labels, handle=req.handle,
                        owner=Owner(type="cni", container_id=req.container_id, ifname=req.ifname, netns=req.netns),
                        interface=host_ifname(req.container_id, req.ifname),
                        security_groups=list(cfg.get("security_groups") or []), ports=ports)

    async def _create(self, ep: Endpoint) -> Endpoint:
        """The endpoint as the server stored it (its addresses allocated); what went wrong as a CNI
        error: try again later when the server is unreachable or failing, invalid config otherwise."""
        try:
            return await self._create_once_named(ep)
        except ServerUnreachable as e:
            raise cp.CniError(cp.TRY_AGAIN_LATER, f"try again later: {e}") from None
        except ApiError as e:
            code = cp.TRY_AGAIN_LATER if e.status >= 500 else cp.INVALID_CONFIG
            raise cp.CniError(code, f"cannot create the endpoint: {e.detail}") from None

    async def _create_once_named(self, ep: Endpoint) -> Endpoint:
        client = self.client
        for attempt in range(3):
            try:
                return await client.create_endpoint(ep)
            except ApiError as e:
                if e.status == 400 and f"namespace {ep.namespace!r} does not exist" in e.detail and attempt == 0:
                    await client.apply(Namespace(name=ep.namespace,
                                                 labels={"kubernetes.io/metadata.name": ep.namespace}))
                    continue
                if e.status == 409 and "already exists" in e.detail and attempt < 2:
                    # same pod name (or container ids sharing a prefix): disambiguate by the whole handle
                    ep.name = names.disambiguated(ep.name, ep.handle or ep.id)
                    continue
                raise
        raise AssertionError("unreachable")

    async def add(self, req: cp.Request) -> bytes:
        """The server allocates the addresses while a worker thread makes the veth (its name and MAC
        do not depend on them): the round trip and the netlink work overlap, then the addresses go on."""
        if not os.path.exists(req.netns):
            raise cp.CniError(cp.UNKNOWN_CONTAINER, f"network namespace {req.netns} does not exist")
        net = self.local.networks.get(req.network)
        want = self._endpoint_for(req)
        kubeconfig = (req.config.get("kubernetes") or {}).get("kubeconfig")
        if kubeconfig and req.args.get("K8S_POD_NAME"):  # kubelet passes no labels: ask the apiserver
            from tether.kube.pod_labels import pod_labels

            found = await asyncio.to_thread(pod_labels, kubeconfig, want.namespace, req.args["K8S_POD_NAME"])
            if found is not None:
                want.labels = {**found[0], **want.labels}
                want.ports = want.ports or found[1]
        assert want.interface is not None
        self.local.protect(want.interface)
        t0 = time.perf_counter()
        early = None
        if net is not None:  # otherwise the MTU is known only once the network is fetched
            early = asyncio.ensure_future(self._plug(req, want, self.local.mtu(net)))
        try:
            ep = await self._create(want)
        except BaseException:
            if early is not None:
                await self._discard(early)
            raise
        t1 = time.perf_counter()
        if net is None:
            net = await self.local.network(req.network, self.client)
        mtu = self.local.mtu(net)
        assert ep.interface is not None
        self.local.protect(ep.interface)
        from tether.dataplane.pods import AttachError, address_pod

        try:
            link = await early if early is not None else None
            if link is not None and (link.host_ifname, link.mac) != (ep.interface, ep.mac or link.mac):
                # the server answered an earlier ADD's endpoint (same handle) that differs: plug that one
                await self._netlink(link.discard)
                link = None
            link = link or await self._plug(req, ep, mtu)
            pod = await self._netlink(address_pod, link, list(ep.ips))
        except (cp.CniError, AttachError, OSError) as e:
            await self._release(req.handle, ep.interface)
            raise e if isinstance(e, cp.CniError) else cp.CniError(cp.IO_FAILURE, f"cannot plug the pod: {e}") from None
        log.info("ADD %s: endpoint %.1f ms, plug %.1f ms after it", ep.name, (t1 - t0) * 1000,
                 (time.perf_counter() - t1) * 1000)
        maps = (req.config.get("runtimeConfig") or {}).get("portMappings")
        if maps:
            try:
                await self._publish(host_port_service(maps, req.handle, ep, self.local.host))
            except cp.CniError:
                await self._release(req.handle, ep.interface)
                raise
        self.local.put(ep)  # visible to the plan before the watch echoes it
        self.local.kick(gather=False)
        attachment = cp.Attachment(pod.host_ifname, pod.host_mac, req.ifname, pod.mac, req.netns, list(ep.ips),
                                   POD_GATEWAY, dns=self.dns(net, ep.namespace), mtu=mtu)
        return json.dumps(cp.chain(req.config.get("prevResult"), cp.result(req.version, attachment))).encode()

    async def _publish(self, svc: Service) -> None:
        try:
            await self.client.apply(svc)
        except ServerUnreachable as e:
            raise cp.CniError(cp.TRY_AGAIN_LATER, f"try again later: cannot publish the host ports: {e}") from None
        except ApiError as e:
            ports = ", ".join(f"{p.node_port}/{p.protocol}" for p in svc.ports)
            raise cp.CniError(cp.INVALID_CONFIG, f"cannot publish host port {ports}: {e.detail}") from None

    async def _plug(self, req: cp.Request, ep: Endpoint, mtu: int) -> PodLink:
        from tether.dataplane.pods import AttachError, plug_link

        assert ep.interface is not None
        try:
            return await self._netlink(plug_link, pod_netns=req.netns, ifname=req.ifname,
                                       host_ifname=ep.interface, mac=ep.mac, mtu=mtu)
        except (AttachError, OSError) as e:
            raise cp.CniError(cp.IO_FAILURE, f"cannot plug the pod: {e}") from None

    async def _discard(self, early: asyncio.Future) -> None:
        """Remove a veth made for an ADD that failed on the server side (or a plug that failed)."""
        try:
            link = await early
        except (cp.CniError, OSError):
            return  # nothing was made (plug_link cleans up after itself)
        await self._netlink(link.discard)

    async def _release(self, handle: str, host_if: str) -> None:
        from tether.dataplane.pods import detach_pod

        await self._netlink(detach_pod, host_if)
        try:
            await self.client.release_by_handle(handle)
        except (ServerUnreachable, ApiError) as e:
            log.error("could not release %s after a failed ADD: %s (the GC will reclaim it)", handle, e)

    # --- DEL / CHECK / STATUS / GC ----------------------------------------------------------------

    async def delete(self, req: cp.Request) -> bytes:
        from tether.dataplane.pods import detach_pod

        host_if = host_ifname(req.container_id, req.ifname)
        await self._netlink(detach_pod, host_if)
        self.local.unprotect(host_if)
        try:
            await self.client.release_by_handle(req.handle)
        except ServerUnreachable as e:
            raise cp.CniError(cp.TRY_AGAIN_LATER, f"try again later: the pod is unplugged but its address "
                                                  f"cannot be released yet: {e}") from None
        if (req.config.get("runtimeConfig") or {}).get("portMappings"):
            namespace = req.args.get("K8S_POD_NAMESPACE") or req.config.get("namespace") or "default"
            ns = names.dns_label(namespace, "default")
            try:
                await self.client.delete("Service", f"{ns}/{names.host_port_name(req.handle)}")
            except ApiError as e:
                if e.status != 404:
                    raise cp.CniError(cp.TRY_AGAIN_LATER, f"cannot unpublish the host ports: {e.detail}") from None
        self.local.remove_handle(req.handle)
        self.local.kick()
        return b""

    async def check(self, req: cp.Request) -> bytes:
        from tether.dataplane.pods import check_pod

        ep = next((e for e in self.local.endpoints if e.handle == req.handle), None)
        if ep is None:
            raise cp.CniError(cp.UNKNOWN_CONTAINER, f"no Tether endpoint for container {req.container_id} "
                                                    f"interface {req.ifname}")
        problems = await self._netlink(check_pod, pod_netns=req.netns, ifname=req.ifname,
                                       host_ifname=host_ifname(req.container_id, req.ifname), ips=ep.ips)
        prev = set(cp.prev_ips(req.config))
        if prev and prev != set(ep.ips):
            problems.append(f"prevResult addresses {sorted(prev)} differ from the endpoint's {ep.ips}")
        if problems:
            raise cp.CniError(cp.CHECK_FAILED, "; ".join(problems))
        return b""

    async def status(self, req: cp.Request) -> bytes:
        problem = self.not_ready()
        if problem is not None:
            raise cp.CniError(cp.PLUGIN_NOT_AVAILABLE, "the Tether agent has not synchronised with the server "
                                                       f"yet ({problem}); pods cannot be added")
        return b""

    async def gc(self, req: cp.Request) -> bytes:
        from tether.dataplane.pods import detach_pod

        valid = cp.valid_attachments(req.config)
        stale = [e for e in self.local.endpoints
                 if e.host == self.local.host and e.network == req.network and e.owner.type == "cni"
                 and (e.owner.container_id or "", e.owner.ifname or "") not in valid]
        for ep in stale:
            if ep.interface:
                await self._netlink(detach_pod, ep.interface)
            try:
                await self.client.release_by_handle(ep.handle or ep.id)
            except ServerUnreachable as e:
                raise cp.CniError(cp.TRY_AGAIN_LATER, f"try again later: {e}") from None
            log.info("GC released %s (%s)", ep.name, ", ".join(ep.ips))
        return b""


def host_port_service(maps: Any, handle: str, ep: Endpoint, host: str) -> Service:
    """CNI `portMappings` (capability portMappings: podman -p, Kubernetes hostPort) -> a NodePort
    service published on this host only (and on hostIP only, when given), backed by the container."""
    if not isinstance(maps, list) or not all(isinstance(m, dict) for m in maps):
        raise cp.CniError(cp.INVALID_CONFIG, "runtimeConfig.portMappings must be a list of objects")
    ports, host_ips = [], set()
    for m in maps:
        hp, cport = m.get("hostPort"), m.get("containerPort")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535 for v in (hp, cport)):
            raise cp.CniError(cp.INVALID_CONFIG, f"portMappings entry {m}: hostPort and containerPort must be 1-65535")
        proto = str(m.get("protocol") or "tcp").upper()
        if proto not in ("TCP", "UDP"):
            raise cp.CniError(cp.INVALID_CONFIG, f"portMappings entry {m}: tether publishes tcp and udp, not {proto}")
        hip = m.get("hostIP") or ""
        if hip not in ("", "0.0.0.0"):
            try:
                if ipaddress.ip_address(hip).version != 4:
                    raise ValueError
            except ValueError:
                raise cp.CniError(cp.INVALID_CONFIG, f"portMappings hostIP {hip!r}: give an IPv4 address of the "
                                                     "host, or none for all") from None
            host_ips.add(hip)
        ports.append(ServicePort(name=f"{proto.lower()}-{hp}", protocol=proto, port=hp, target_port=cport,
                                 node_port=hp))
    if len(host_ips) > 1 or (host_ips and len(host_ips) != len(maps)):
        raise cp.CniError(cp.INVALID_CONFIG, "tether publishes a container's host ports on one address of the host, "
                                             "or on all: give every mapping the same hostIP, or none")
    return Service(name=names.host_port_name(handle), namespace=ep.namespace, network=ep.network, type="NodePort",
                   host=host, host_ip=next(iter(host_ips), None), ports=ports,
                   backends=[ServiceBackend(ip=ip, endpoint=ep.id) for ip in ep.ips if ":" not in ip],
                   labels={"tether.io/cni": "true"})
