"""Docker's libnetwork remote network driver and remote IPAM driver, served by the agent.

dockerd finds the plugin by its socket (`/run/docker/plugins/tether.sock`, or
`$TETHER_DOCKER_PLUGIN_SOCKET`) and calls `POST /<Method>` with JSON. How Docker's calls map onto
Tether objects, and why:
- A Docker network is a view of a Tether network, matched by its subnet. `docker network create` on
  one host creates the Tether network (named after the Docker network, asked of dockerd's API) and
  labels it `tether.io/created-by=docker`; every other agent sees the label and creates the same
  Docker network in its dockerd, so a network created once is usable on every Docker host.
  Networks made otherwise (`tether network create`) are adopted by subnet, never copied or removed.
  `docker network rm` removes a Docker-made Tether network (refused while containers on any host
  use it), and the other agents then remove their copies. A host credential may create and delete
  exactly such networks (the server's node authorizer), so no agent needs the admin token for it.
- Tether's IPAM is required (`--ipam-driver tether`): Docker's default IPAM would hand out
  172.x addresses the Tether network does not have. libnetwork has no way for a network driver to
  pick its IPAM, so a network made without it is refused with the command to use.
- IPAM comes before the endpoint in Docker's order (RequestAddress, CreateEndpoint, Join), so
  RequestAddress creates the Tether Endpoint at once (the server allocates the address
  atomically, as for CNI) under a provisional name; CreateEndpoint records the Docker endpoint
  id, MAC and host interface; after Join, dockerd is asked which container it is, and the
  endpoint takes the container's name (so Tether DNS resolves it everywhere) and its labels (so
  NetworkPolicy selects it). dockerd cannot be asked during Join itself: it holds the container.
- The container gets a /32, a route to the link-local gateway 169.254.1.1 and a default route
  through it, like a pod (no docker_gwbridge); the host side answers ARP by proxy.
- Published ports (-p) become a NodePort Service whose backend is the container, published on this
  host only (`Service.host`; `-p IP:...` on that address only, `Service.host_ip`), as Docker does.
- Swarm: Docker takes only a managed plugin for swarm-scoped networks, so the agent serves a second
  socket (`$TETHER_DOCKER_SWARM_SOCKET`) that such a plugin forwards to (`tether.lab.swarm` builds
  it). There the network driver is global-scoped and the IPAM is Swarm's own: the leader allocates
  every task's address cluster-wide, so this driver honours the address a task arrives with
  (CreateEndpoint creates its Tether endpoint, DeleteEndpoint releases it). The Tether network is
  labelled `tether.io/docker-scope: swarm` and never copied into dockerd as a local network.
Every call is idempotent, so retries by dockerd and restarts of either side are safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from tether import yielding
from tether.agent.docker.plugin_http import PluginHttpServer
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc import names
from tether.calc.names import POD_GATEWAY, POD_GATEWAY6, host_ifname
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable
from tether.model import Endpoint, Network, Owner, Service, ServiceBackend, ServicePort, Subnet
from tether.server.auth import DOCKER_NETWORK_LABEL, DOCKER_NETWORK_VALUE

if TYPE_CHECKING:
    from tether.agent.extras import AgentHandle

log = logging.getLogger("tether.docker")

DEFAULT_SOCKET = "/run/docker/plugins/tether.sock"
DEFAULT_DOCKER_HOST = "unix:///run/docker.sock"
GATEWAY_TYPE = "com.docker.network.gateway"
GENERIC = "com.docker.network.generic"
PORTMAP = "com.docker.network.portmap"
PROTOCOLS = {6: "TCP", 17: "UDP"}
ADDRESS_SPACE = "tether"  # our IPAM's address space: Docker's default IPAM says "LocalDefault"
RESYNC_EVERY = 10.0  # seconds: a dockerd started (or reset) on a quiet cluster still gets the networks
DEFAULT_SWARM_SOCKET = "/run/tether/docker-swarm/tether.sock"  # the managed plugin's forwarder connects here
SWARM_LABEL = "tether.io/docker-scope"  # = "swarm" on the Tether network of a swarm-scoped Docker network
SWARM = contextvars.ContextVar("swarm", default=False)  # the call came through the Swarm plugin's socket


class DriverError(Exception):
    """An error dockerd shows to the user as `remote: <message>`: say what to do."""


# the fields each libnetwork/IPAM method cannot do without (dockerd always sends them)
REQUIRED = {
    "/NetworkDriver.CreateNetwork": ("NetworkID",), "/NetworkDriver.CreateEndpoint": ("NetworkID", "EndpointID"),
    "/NetworkDriver.DeleteEndpoint": ("EndpointID",), "/NetworkDriver.Join": ("NetworkID", "EndpointID"),
    "/NetworkDriver.Leave": ("EndpointID",), "/NetworkDriver.ProgramExternalConnectivity": ("NetworkID", "EndpointID"),
    "/NetworkDriver.RevokeExternalConnectivity": ("EndpointID",),
}


def _is_network(text: Any) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except (ValueError, TypeError):
        return False


def check_request(path: str, req: dict[str, Any]) -> None:
    """The shape of a driver request, checked before any method reads it: a missing ID or a field of
    the wrong type (a crafted request, or another dockerd version) is refused with what is wrong
    instead of failing inside the method as an internal error with a traceback."""
    for key in REQUIRED.get(path, ()):
        if not isinstance(req.get(key), str) or not req[key]:
            raise DriverError(f"the request has no {key} (a non-empty string); is this dockerd's libnetwork?")
    for key in ("NetworkID", "EndpointID", "PoolID", "Pool", "SubPool", "Address", "AddressSpace", "SandboxKey"):
        if req.get(key) is not None and not isinstance(req[key], str):
            raise DriverError(f"{key} must be a string, not {type(req[key]).__name__}")
    for key in ("Options", "Interface"):
        if req.get(key) is not None and not isinstance(req[key], dict):
            raise DriverError(f"{key} must be an object, not {type(req[key]).__name__}")
    for key in ("Pool", "SubPool"):
        if req.get(key) and not _is_network(req[key]):
            raise DriverError(f"{key} {req[key]!r} is not a CIDR; write it like 10.77.0.0/16")
    if req.get("PoolID") and not _is_network(req["PoolID"].removeprefix("tether/")):
        raise DriverError(f"PoolID {req['PoolID']!r} is not a pool of tether's IPAM (tether/<CIDR>)")
    if req.get("Address") and not _is_network(req["Address"]):
        raise DriverError(f"Address {req['Address']!r} is not an IP address")
    data = req.get("IPv4Data")
    if data is not None and (not isinstance(data, list) or not all(isinstance(d, dict) for d in data)):
        raise DriverError("IPv4Data must be a list of objects")
    for d in data or []:
        for key in ("Pool", "Gateway"):
            if d.get(key) is not None and (not isinstance(d[key], str) or not _is_network(d[key])):
                raise DriverError(f"IPv4Data {key} {d[key]!r} is not a CIDR or address")
    iface = req.get("Interface") or {}
    for key in ("Address", "AddressIPv6", "MacAddress"):
        if iface.get(key) is not None and not isinstance(iface[key], str):
            raise DriverError(f"Interface.{key} must be a string")
    if iface.get("Address") and not _is_network(iface["Address"]):
        raise DriverError(f"Interface.Address {iface['Address']!r} is not an IP address")
    options = req.get("Options") or {}
    generic = options.get(GENERIC)
    if generic is not None and (not isinstance(generic, dict)
                                or not all(isinstance(v, str | int | bool) for v in generic.values())):
        raise DriverError("the network's -o options must be an object of strings")
    ports = options.get(PORTMAP)
    if ports is not None:
        if not isinstance(ports, list) or not all(isinstance(m, dict) for m in ports):
            raise DriverError("the published ports must be a list of objects")
        for m in ports:
            for key in ("Proto", "Port", "HostPort", "HostPortEnd"):
                if m.get(key) is not None and (not isinstance(m[key], int) or isinstance(m[key], bool)
                                               or not 0 <= m[key] <= 65535):
                    raise DriverError(f"published port field {key}={m[key]!r} must be a number 0-65535")




def parse_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise DriverError(f"option {what}={value!r} is not a boolean; use true or false")


def network_options(generic: dict[str, Any]) -> dict[str, Any]:
    """`docker network create -o k=v` options -> Tether Network fields (and security groups)."""
    out: dict[str, Any] = {}
    for key, value in (generic or {}).items():
        k = key.removeprefix("tether.").replace("_", "-")
        if k in ("encap", "encapsulation"):
            if value not in ("vxlan", "direct", "auto"):
                raise DriverError(f"option {key}={value!r}: encap must be vxlan, direct or auto")
            out["encap"] = value
        elif k in ("nat-outgoing", "nat"):
            out["nat_outgoing"] = parse_bool(value, key)
        elif k in ("mtu", "com.docker.network.driver.mtu"):
            try:
                out["mtu"] = int(value)
            except ValueError:
                raise DriverError(f"option {key}={value!r}: the MTU must be a number (576-9000)") from None
        elif k in ("security-groups", "security-group", "sg"):
            out["security_groups"] = [s for s in str(value).replace(";", ",").split(",") if s]
        elif k in ("network", "name"):
            out["name"] = str(value)
        elif k in ("dns-domain",):
            out["dns_domain"] = str(value)
        else:
            raise DriverError(f"unknown option {key!r}; tether understands encap, nat-outgoing, mtu, "
                              "security-groups, dns-domain and network (the Tether network's name)")
    return out


class DockerApi:
    """Just enough of dockerd's API to learn a network's name and a container's name and labels."""

    def __init__(self, url: str) -> None:
        path = url.removeprefix("unix://")
        self.http = httpx.AsyncClient(base_url="http://docker", transport=httpx.AsyncHTTPTransport(uds=path),
                                      timeout=10)

    async def get(self, path: str, timeout: float = 10, params: dict[str, str] | None = None) -> Any:
        r = await self.http.get(path, timeout=timeout, params=params)
        r.raise_for_status()
        return r.json()

    async def post(self, path: str, body: dict[str, Any], timeout: float = 60) -> Any:
        r = await self.http.post(path, json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    async def delete(self, path: str, timeout: float = 60) -> None:
        r = await self.http.delete(path, timeout=timeout)
        if r.status_code != 404:
            r.raise_for_status()

    async def close(self) -> None:
        await self.http.aclose()


class DockerPlugin:
    def __init__(self, local: LocalEndpoints, client: AsyncTetherClient, state_dir: str, socket_path: str,
                 docker_host: str, swarm_socket: str | None = None) -> None:
        self.local = local
        self.client = client
        self.server = PluginHttpServer(socket_path, self.call)
        self.swarm_server = PluginHttpServer(swarm_socket, self.call_swarm) if swarm_socket else None
        self.docker = DockerApi(docker_host)
        self.state_path = os.path.join(state_dir, "docker.json")
        self.networks: dict[str, dict[str, Any]] = {}  # docker network id -> {"network", "cidr", ...}
        self.endpoints: dict[str, str] = {}  # docker endpoint id -> Tether endpoint id
        # (Tether network, address) -> Tether endpoint id, from RequestAddress until CreateEndpoint: a
        # restarted agent's replica (loaded from disk) may still hold an older endpoint with that address
        self.allocated: dict[tuple[str, str], str] = {}
        self.pending6: dict[str, list[str]] = {}  # Tether network -> IPv6 addresses allocated, not yet asked for
        self.tasks: set[asyncio.Task] = set()
        self._synced: frozenset[tuple[str, str]] | None = None  # the Docker-made networks last copied to dockerd
        self._sync_lock = asyncio.Lock()
        self._load()
        self.methods = {
            "/Plugin.Activate": self.activate,
            "/NetworkDriver.GetCapabilities": self.net_capabilities,
            "/NetworkDriver.CreateNetwork": self.create_network,
            "/NetworkDriver.DeleteNetwork": self.delete_network,
            "/NetworkDriver.AllocateNetwork": self.empty,
            "/NetworkDriver.FreeNetwork": self.empty,
            "/NetworkDriver.CreateEndpoint": self.create_endpoint,
            "/NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "/NetworkDriver.EndpointOperInfo": self.oper_info,
            "/NetworkDriver.Join": self.join,
            "/NetworkDriver.Leave": self.leave,
            "/NetworkDriver.ProgramExternalConnectivity": self.program_external,
            "/NetworkDriver.RevokeExternalConnectivity": self.revoke_external,
            "/NetworkDriver.DiscoverNew": self.empty,
            "/NetworkDriver.DiscoverDelete": self.empty,
            "/IpamDriver.GetCapabilities": self.ipam_capabilities,
            "/IpamDriver.GetDefaultAddressSpaces": self.address_spaces,
            "/IpamDriver.RequestPool": self.request_pool,
            "/IpamDriver.ReleasePool": self.empty,
            "/IpamDriver.RequestAddress": self.request_address,
            "/IpamDriver.ReleaseAddress": self.release_address,
        }

    # --- lifetime -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.server.start()
        if self.swarm_server is not None:
            try:
                os.makedirs(os.path.dirname(self.swarm_server.path) or ".", exist_ok=True)
                await self.swarm_server.start()
                log.warning("docker swarm plugin socket %s (for the managed plugin's forwarder)",
                            self.swarm_server.path)
            except OSError as e:  # Swarm only: the local driver keeps working
                log.error("cannot serve the docker swarm socket %s: %s; set TETHER_DOCKER_SWARM_SOCKET to a "
                          "writable path, or off", self.swarm_server.path, e)
                self.swarm_server = None
        for nid, info in self.networks.items():
            if info.get("network") is None and not info.get("error"):
                self._spawn(self._name_network(nid))  # a restart interrupted the naming
        self._spawn(self._resync_loop())
        log.warning("docker plugin serving %s", self.server.path)

    async def close(self) -> None:
        await self.server.close()
        if self.swarm_server is not None:
            await self.swarm_server.close()
        for t in list(self.tasks):
            t.cancel()
        await self.docker.close()

    def update(self, replica: Any) -> None:
        """After a plan: when the set of Docker-made Tether networks changed, copy it into dockerd."""
        wanted = docker_made(replica.networks.values())
        if frozenset(wanted.items()) != self._synced:
            self._spawn(self._sync(wanted))

    async def _sync(self, wanted: dict[str, str]) -> None:
        """Create in this dockerd each Docker-made Tether network it lacks, and remove the copies of
        those deleted elsewhere (checked with the server: a replica still loading must not remove
        anything). Quiet when no dockerd runs here: not every Tether host is a Docker host."""
        async with self._sync_lock:
            try:
                present = await self.docker.get("/networks", params={"filters": json.dumps({"driver": ["tether"]})})
            except (httpx.HTTPError, ValueError, OSError) as e:
                log.debug("no dockerd to copy networks into: %s", e)
                return
            ok = True
            for name, cidr, body in to_create(wanted, present, self.networks):
                try:
                    await self.docker.post("/networks/create", body)
                    log.info("docker network %s (%s) created here: it was made on another Docker host", name, cidr)
                except httpx.HTTPError as e:
                    ok = False
                    log.warning("cannot create docker network %s (%s) made on another host: %s", name, cidr,
                                getattr(getattr(e, "response", None), "text", e))
            for nid, info in list(self.networks.items()):
                if not info.get("docker_made") or info.get("network") in wanted or not info.get("network") \
                        or info.get("swarm"):  # Swarm's networks are Swarm's to remove
                    continue
                try:
                    await self.client.get("Network", info["network"])
                    continue  # still there: the replica is behind
                except ApiError as e:
                    if e.status != 404:
                        continue
                except ServerUnreachable:
                    ok = False
                    continue
                try:
                    await self.docker.delete(f"/networks/{nid}")
                    log.info("docker network %s removed here: it was removed on another Docker host", info["network"])
                except httpx.HTTPError as e:  # containers here still use it: the server had no endpoint yet
                    ok = False
                    log.warning("cannot remove docker network %s, removed elsewhere: %s", info["network"],
                                getattr(getattr(e, "response", None), "text", e))
            if ok:
                self._synced = frozenset(wanted.items())

    def _load(self) -> None:
        with contextlib.suppress(OSError, ValueError), open(self.state_path) as f:
            data = json.load(f)
            self.networks, self.endpoints = data.get("networks", {}), data.get("endpoints", {})

    def _save(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"networks": self.networks, "endpoints": self.endpoints}, f)
        os.replace(tmp, self.state_path)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # --- dispatch -----------------------------------------------------------------------------------

    async def call(self, path: str, req: dict) -> dict:
        err = "Error" if path.startswith("/IpamDriver.") else "Err"  # the two APIs name the field differently
        fn = self.methods.get(path)
        if fn is None:
            log.warning("docker called an unknown method %s", path)
            return {err: f"tether does not implement {path.lstrip('/')}"}
        t0 = time.perf_counter()
        yielding.enter()  # dockerd waits for this answer: applies step aside meanwhile
        try:
            check_request(path, req)
            out = await fn(req)
        except DriverError as e:
            log.warning("docker %s refused: %s", path.lstrip("/"), e)
            return {err: str(e)}
        except ServerUnreachable as e:
            return {err: f"the Tether server is unreachable, try again: {e}"}
        except ApiError as e:
            return {err: f"Tether server refused: {e.detail}"}
        finally:
            yielding.leave()
        log.info("docker %s ok in %.1f ms", path.lstrip("/"), (time.perf_counter() - t0) * 1000)
        return out

    async def call_swarm(self, path: str, req: dict) -> dict:
        """A call through the managed plugin that Swarm uses: the same driver, global-scoped (so the
        Swarm leader allocates addresses cluster-wide and hands them to each task), no IPAM of ours."""
        if path == "/Plugin.Activate":
            return {"Implements": ["NetworkDriver"]}
        if path == "/NetworkDriver.GetCapabilities":
            return {"Scope": "global", "ConnectivityScope": "global"}
        if path.startswith("/IpamDriver."):
            return {"Error": "Swarm allocates the addresses of a tether-swarm network: create it without "
                             "--ipam-driver (docker network create -d tether-swarm:latest --scope swarm "
                             "--attachable --subnet CIDR NAME)"}
        token = SWARM.set(True)
        try:
            return await self.call(path, req)
        finally:
            SWARM.reset(token)

    async def empty(self, req: dict) -> dict:
        return {}

    async def activate(self, req: dict) -> dict:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    async def net_capabilities(self, req: dict) -> dict:
        return {"Scope": "local", "ConnectivityScope": "global"}

    async def ipam_capabilities(self, req: dict) -> dict:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    async def address_spaces(self, req: dict) -> dict:
        return {"LocalDefaultAddressSpace": "tether", "GlobalDefaultAddressSpace": "tether"}

    # --- networks -----------------------------------------------------------------------------------

    async def network_by_cidr(self, cidr: str) -> tuple[Network, Subnet] | None:
        nets = list(self.local.networks.values())
        for attempt in range(2):
            for net in nets:
                for sub in net.subnets:
                    if sub.cidr == cidr:
                        return net, sub
            if attempt == 0:  # not in the replica yet: ask the server
                nets = await self.client.list("Network")
        return None

    async def request_pool(self, req: dict) -> dict:
        pool = req.get("Pool") or ""
        if not pool:
            raise DriverError("tether needs the network's subnet: docker network create -d tether "
                              "--ipam-driver tether --subnet CIDR NAME")
        try:
            cidr = str(ipaddress.ip_network(pool, strict=True))
        except ValueError as e:
            raise DriverError(f"--subnet {pool!r} is not a valid CIDR ({e}); write it like 10.77.0.0/16") from None
        if req.get("SubPool") and req["SubPool"] != cidr:
            raise DriverError("tether allocates from the whole subnet; drop --ip-range")
        return {"PoolID": f"tether/{cidr}", "Pool": cidr, "Data": {}}

    def _overlap(self, cidr: str) -> Network | None:
        mine = ipaddress.ip_network(cidr)
        for net in self.local.networks.values():
            for sub in net.subnets:
                other = ipaddress.ip_network(sub.cidr)
                if other.version == mine.version and other != mine and other.overlaps(mine):
                    return net
        return None

    async def create_network(self, req: dict) -> dict:
        nid = req["NetworkID"]
        data = [d for d in req.get("IPv4Data") or [] if d.get("Pool")]
        if len(data) != 1:
            raise DriverError("a tether network needs exactly one IPv4 subnet (--subnet CIDR) and the tether IPAM "
                              "driver (--ipam-driver tether)")
        data6 = [d for d in req.get("IPv6Data") or [] if d.get("Pool")]
        if len(data6) > 1:
            raise DriverError("a tether network has at most one IPv6 subnet (--ipv6 --subnet CIDR6)")
        swarm = SWARM.get()
        if swarm and data6:
            raise DriverError("tether-swarm networks are IPv4 only for now; drop --ipv6 (a local tether network "
                              "takes --ipv6)")
        if not swarm and data[0].get("AddressSpace") not in (None, ADDRESS_SPACE) and nid not in self.networks:
            raise DriverError(f"tether networks need tether's IPAM: Docker's default IPAM gave {data[0]['Pool']}, "
                              "which no container could use; run docker network create -d tether "
                              "--ipam-driver tether --subnet CIDR NAME")
        cidr = data[0]["Pool"]
        cidr6 = data6[0]["Pool"] if data6 else None
        opts = network_options((req.get("Options") or {}).get(GENERIC) or {})
        sgs = opts.pop("security_groups", [])
        wanted_name = opts.pop("name", None)
        info: dict[str, Any] = {"network": None, "cidr": cidr, "security_groups": sgs, "options": opts,
                                "gateway": data[0].get("Gateway", "").split("/")[0] or None, "error": None}
        if cidr6:
            info["cidr6"] = cidr6
        if swarm:
            info["swarm"] = True
        found = await self.network_by_cidr(cidr)
        if found is not None:
            net, _ = found
            v6 = sorted(s.cidr for s in net.subnets if ":" in s.cidr)
            if v6 != ([str(ipaddress.ip_network(cidr6))] if cidr6 else []):
                raise DriverError(f"Tether network {net.name!r} ({cidr}) has IPv6 subnets {v6 or 'none'}; create the "
                                  "Docker network with the same (--ipv6 --subnet CIDR6, or without --ipv6)")
            if wanted_name and wanted_name != net.name:
                raise DriverError(f"subnet {cidr} belongs to Tether network {net.name!r}, not {wanted_name!r}; "
                                  f"use -o network={net.name} or another --subnet")
            clash = {k: (getattr(net, k), v) for k, v in opts.items() if getattr(net, k) != v}
            if clash:
                what = ", ".join(f"{k} is {a!r} there, {b!r} asked" for k, (a, b) in clash.items())
                raise DriverError(f"Tether network {net.name!r} ({cidr}) already exists with other settings ({what});"
                                  " drop those -o options to join it as it is")
            info["network"] = net.name
            info["docker_made"] = net.labels.get(DOCKER_NETWORK_LABEL) == DOCKER_NETWORK_VALUE
            log.info("docker network %s adopts Tether network %s (%s)", nid[:12], net.name, cidr)
        else:
            other = self._overlap(cidr) or (self._overlap(cidr6) if cidr6 else None)
            if other is not None:
                raise DriverError(f"subnet {cidr} overlaps Tether network {other.name!r} "
                                  f"({', '.join(s.cidr for s in other.subnets)}); choose another --subnet, or the "
                                  "same subnet to share that network")
            if wanted_name:
                info["network"] = await self._create_tether_network(names.dns_label(wanted_name, wanted_name), info)
                info["docker_made"] = True
            else:
                # dockerd stores the network (and its name) only after this call returns: name it then
                self._spawn(self._name_network(nid))
        self.networks[nid] = info
        self._save()
        return {}

    async def _create_tether_network(self, name: str, info: dict[str, Any]) -> str:
        try:
            subnets = [Subnet(cidr=info["cidr"], gateway=info.get("gateway"))]
            if info.get("cidr6"):
                subnets.append(Subnet(cidr=str(ipaddress.ip_network(info["cidr6"]))))
            labels = {DOCKER_NETWORK_LABEL: DOCKER_NETWORK_VALUE}
            if info.get("swarm"):
                labels[SWARM_LABEL] = "swarm"
            net = await self.client.apply(Network(name=name, subnets=subnets, labels=labels,
                                                  **info.get("options", {})))
        except ValueError as e:
            raise DriverError(f"invalid network options: {e}") from None
        except ApiError as e:
            hint = (f"; create it as the admin first (tether network create {name} --subnet {info['cidr']}), then "
                    "this command adopts it" if e.status == 403 else "")
            raise DriverError(f"cannot create Tether network {name!r} with subnet {info['cidr']}: {e.detail}{hint}") \
                from None
        log.info("created Tether network %s (%s) for Docker", net.name, info["cidr"])
        return net.name

    async def _name_network(self, nid: str) -> None:
        """Create the Tether network under the Docker network's name, once dockerd can tell it."""
        deadline, delay = time.monotonic() + 60, 0.02
        while time.monotonic() < deadline and nid in self.networks:
            try:
                name = (await self.docker.get(f"/networks/{nid}", timeout=5)).get("Name")
            except (httpx.HTTPError, ValueError):
                name = None
            if name:
                info = self.networks[nid]
                found = await self.network_by_cidr(info["cidr"])
                try:
                    if found is not None:  # another host created it meanwhile
                        info["network"] = found[0].name
                        info["docker_made"] = found[0].labels.get(DOCKER_NETWORK_LABEL) == DOCKER_NETWORK_VALUE
                    else:
                        info["network"] = await self._create_tether_network(names.dns_label(name, f"docker-{nid[:12]}"),
                                                                            info)
                        info["docker_made"] = True
                except DriverError as e:
                    found = await self.network_by_cidr(info["cidr"])  # another host won the race to create it
                    if found is not None and found[0].labels.get(DOCKER_NETWORK_LABEL) == DOCKER_NETWORK_VALUE:
                        info["network"], info["docker_made"] = found[0].name, True
                    else:
                        info["error"] = str(e)
                        log.error("docker network %s (%s): %s", name, nid[:12], e)
                self._save()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def delete_network(self, req: dict) -> dict:
        """`docker network rm`: a Tether network made by Docker goes too (the server refuses while any
        host still has endpoints in it, and that refusal is the user's answer); one adopted from
        `tether network create` stays, it is not Docker's to remove."""
        nid = req.get("NetworkID", "")
        info = self.networks.pop(nid, None)
        if info is None:
            return {}
        self._save()  # dockerd removes its network whatever we answer (libnetwork only logs a driver's error)
        if info.get("docker_made") and info.get("network"):
            try:
                await self.client.delete("Network", info["network"])
                log.info("removed Tether network %s with its Docker network", info["network"])
            except ApiError as e:
                if e.status == 409 and info.get("swarm"):  # tasks on other nodes: the last node removes it
                    log.info("Tether network %s stays: other Swarm nodes still use it", info["network"])
                    return {}
                if e.status == 409:  # in use on another host: it stays, so this host gets its copy back
                    self._synced = None
                    self._spawn(self._resync_later())
                    raise DriverError(f"Tether network {info['network']!r} stays, in use on other hosts, and comes "
                                      f"back here: {e.detail}") from None
                if e.status != 404:
                    raise
        return {}

    async def _resync_loop(self) -> None:
        """Copy the networks again now and then, not only when they change: dockerd may start after
        the agent, or lose its networks, while nothing in the cluster changes."""
        while True:
            await asyncio.sleep(RESYNC_EVERY)
            try:
                await self._sync(docker_made(self.local.networks.values()))
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("copying Docker networks into dockerd failed")

    async def _resync_later(self, delay: float = 1.0) -> None:
        await asyncio.sleep(delay)  # once dockerd has finished removing its copy
        await self._sync(docker_made(self.local.networks.values()))

    async def _wait_named(self, info: dict[str, Any], timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while info.get("network") is None:
            if info.get("error"):
                raise DriverError(info["error"])
            if time.monotonic() > deadline:
                raise DriverError(f"the Tether network for subnet {info['cidr']} is not created yet (dockerd did "
                                  "not tell its name); try again, or recreate it with -o network=NAME")
            await asyncio.sleep(0.02)
        return info["network"]

    async def _network_of(self, nid: str) -> tuple[str, dict[str, Any]]:
        info = self.networks.get(nid)
        if info is None:
            raise DriverError(f"docker network {nid[:12]} is not known to this host's Tether agent; recreate it with "
                              "docker network create -d tether --ipam-driver tether --subnet CIDR NAME")
        return await self._wait_named(info), info

    # --- addresses ----------------------------------------------------------------------------------

    async def request_address(self, req: dict) -> dict:
        pool_id = req.get("PoolID", "")
        cidr = pool_id.removeprefix("tether/")
        opts = req.get("Options") or {}
        wanted = req.get("Address") or ""
        if ":" in cidr and opts.get("RequestAddressType") != GATEWAY_TYPE:
            return self._address6(cidr, wanted)
        pending = next((i for i in self.networks.values() if i["cidr"] == cidr and i.get("network") is None), None)
        if pending is not None and opts.get("RequestAddressType") != GATEWAY_TYPE:
            await self._wait_named(pending)
        found = await self.network_by_cidr(cidr)
        if opts.get("RequestAddressType") == GATEWAY_TYPE:
            # Docker's notion of a gateway; containers route via the link-local gateway instead
            plen = ipaddress.ip_network(cidr).prefixlen
            gw = wanted or (found[1].gateway if found and found[1].gateway else None)
            gw = gw or str(next(ipaddress.ip_network(cidr).hosts()))
            return {"Address": f"{gw}/{plen}", "Data": {}}
        if found is None:
            raise DriverError(f"no Tether network has subnet {cidr}; create the Docker network again")
        net, _ = found
        dual = any(":" in s.cidr for s in net.subnets)
        if wanted and dual:
            raise DriverError(f"a fixed --ip on the dual-stack network {net.name} is not supported (Tether picks both "
                              "addresses of an endpoint together); drop --ip")
        # Interface and MAC follow from the Tether id, so this one write is all the server sees until
        # the container is known; the handle is never shared: a second --ip X must fail, not adopt the first
        ep_id = str(uuid.uuid4())
        ep = Endpoint(id=ep_id, name=f"docker-{ep_id[:12]}", network=net.name, host=self.local.host,
                      ips=[wanted] if wanted else [], handle=f"docker/{ep_id}", owner=Owner(type="docker"),
                      interface=host_ifname(ep_id, "docker"), mac=names.docker_endpoint_mac(ep_id),
                      labels={"tether.io/docker": "true"})
        self.local.protect(ep.interface)  # no apply may remove its veth meanwhile
        try:
            ep = await self.client.create_endpoint(ep)
        except ApiError as e:
            if e.status in (400, 409):
                raise DriverError(f"cannot allocate {wanted or 'an address'} in {net.name} ({cidr}): {e.detail}") \
                    from None
            raise
        self.local.put(ep)
        self.allocated[(net.name, ep.ips[0])] = ep.id
        v6 = next((ip for ip in ep.ips if ":" in ip), None)
        if v6:  # dockerd asks for the IPv6 address next, for the same endpoint (libnetwork: IPv4 then IPv6)
            self.pending6.setdefault(net.name, []).append(v6)
        v4 = next(ip for ip in ep.ips if ":" not in ip)
        return {"Address": f"{v4}/32", "Data": {}}

    def _address6(self, cidr: str, wanted: str) -> dict:
        """The IPv6 address of the endpoint the IPv4 request just made (the server allocated both)."""
        if wanted:
            raise DriverError("a fixed --ip6 is not supported (Tether picks both addresses of an endpoint "
                              "together); drop --ip6")
        net = next((n for n in self.local.networks.values() if any(s.cidr == cidr for s in n.subnets)), None)
        queue = self.pending6.get(net.name, []) if net is not None else []
        if not queue:
            raise DriverError(f"no IPv4 address was just allocated on the network of {cidr}: a tether network in "
                              "Docker needs an IPv4 subnet beside the IPv6 one")
        return {"Address": f"{queue.pop(0)}/128", "Data": {}}

    async def _find_by_ip(self, network: str, ip: str) -> Endpoint | None:
        """The endpoint holding an address: the server decides (a replica loaded from disk by a
        restarted agent may still show an older holder); the replica only while the server is away."""
        ep_id = self.allocated.get((network, ip))
        if ep_id is not None:
            ep = self.local.endpoint(ep_id)
            with contextlib.suppress(ApiError):
                return ep or await self.client.get("Endpoint", ep_id)  # type: ignore[return-value]
        try:
            held = await self.client.list("Endpoint", network=network)
        except ServerUnreachable:
            held = [e for e in self.local.endpoints if e.network == network]
        return next((ep for ep in held if ip in ep.ips), None)  # type: ignore[misc, attr-defined]

    async def release_address(self, req: dict) -> dict:
        cidr = req.get("PoolID", "").removeprefix("tether/")
        ip = (req.get("Address") or "").split("/")[0]
        found = await self.network_by_cidr(cidr)
        if found is None or not ip:
            return {}
        ep = await self._find_by_ip(found[0].name, ip)
        self.allocated.pop((found[0].name, ip), None)
        if ep is None or ep.owner.type != "docker" or ep.host != self.local.host:
            return {}  # Docker's gateway address, or already released
        await self.client.release_by_handle(ep.handle or ep.id)
        self.local.remove(ep.id)
        self.local.kick()
        log.info("released %s (%s)", ip, ep.name)
        return {}

    # --- endpoints ----------------------------------------------------------------------------------

    async def _endpoint(self, docker_ep: str, network: str | None = None, ip: str | None = None) -> Endpoint:
        known = self.endpoints.get(docker_ep)
        if known is not None:
            ep = self.local.endpoint(known)
            if ep is not None:
                return ep
            with contextlib.suppress(ApiError):
                return await self.client.get("Endpoint", known)  # type: ignore[return-value]
        for ep in self.local.endpoints:
            if ep.owner.docker_endpoint_id == docker_ep:
                return ep
        if network and ip:
            ep = await self._find_by_ip(network, ip)
            if ep is not None:
                return ep
        for ep in await self.client.list("Endpoint", host=self.local.host):
            if ep.owner.docker_endpoint_id == docker_ep:  # type: ignore[attr-defined]
                return ep  # type: ignore[return-value]
        raise DriverError(f"no Tether endpoint for docker endpoint {docker_ep[:12]}; its address was not "
                          "allocated by tether (use --ipam-driver tether)")

    async def create_endpoint(self, req: dict) -> dict:
        network, info = await self._network_of(req["NetworkID"])
        iface = req.get("Interface") or {}
        ip = (iface.get("Address") or "").split("/")[0]
        if not ip:
            raise DriverError("no IPv4 address for the endpoint; the network must use --ipam-driver tether")
        docker_ep = req["EndpointID"]
        if info.get("swarm"):
            ep = await self._swarm_endpoint(network, docker_ep, ip)
        else:
            ep = await self._endpoint(docker_ep, network, ip)
        ip6 = (iface.get("AddressIPv6") or "").split("/")[0]
        if ip6 and ip6 not in ep.ips:
            raise DriverError(f"IPv6 address {ip6} is not the one Tether gave endpoint {ep.name} ({ep.ips}); "
                              "start the container again")
        self.allocated.pop((network, ip), None)
        self.endpoints[docker_ep] = ep.id
        self._save()
        changes: dict[str, Any] = {}
        mac = (iface.get("MacAddress") or "").lower()
        if mac and mac != ep.mac:
            changes["mac"] = mac
        if info.get("security_groups") and not ep.security_groups:
            changes["security_groups"] = info["security_groups"]
        if changes:  # rare (--mac-address, -o security-groups): the common path writes nothing here
            try:
                ep = await self.client.patch_endpoint(ep.id, changes)
            except ApiError as e:
                raise DriverError(f"cannot set up the endpoint: {e.detail}") from None
        ep = ep.model_copy(update={"owner": ep.owner.model_copy(update={"docker_endpoint_id": docker_ep})})
        self.local.put(ep)
        return {} if iface.get("MacAddress") else {"Interface": {"MacAddress": ep.mac}}

    async def _swarm_endpoint(self, network: str, docker_ep: str, ip: str) -> Endpoint:
        """The Tether endpoint of a Swarm task's address (the leader allocated it, cluster-wide): made
        here, on this host, holding that address; the one made before when dockerd asks again."""
        with contextlib.suppress(DriverError):
            return await self._endpoint(docker_ep)
        ep_id = str(uuid.uuid4())
        ep = Endpoint(id=ep_id, name=f"docker-{ep_id[:12]}", network=network, host=self.local.host, ips=[ip],
                      handle=f"docker/{ep_id}", owner=Owner(type="docker", docker_endpoint_id=docker_ep),
                      interface=host_ifname(ep_id, "docker"), mac=names.docker_endpoint_mac(ep_id),
                      labels={"tether.io/docker": "true", SWARM_LABEL: "swarm"})
        self.local.protect(ep.interface)  # no apply may remove its veth meanwhile
        try:
            ep = await self.client.create_endpoint(ep)
        except ApiError as e:
            self.local.unprotect(ep.interface)
            raise DriverError(f"Swarm gave {ip} in Tether network {network}, which Tether cannot give this task: "
                              f"{e.detail} (is the subnet also used outside Swarm?)") from None
        self.local.put(ep)
        return ep

    async def _unplug(self, docker_ep: str) -> str | None:
        from tether.dataplane.pods import delete_link

        ep = None
        with contextlib.suppress(DriverError, ApiError, ServerUnreachable):
            ep = await self._endpoint(docker_ep)
        host_if = ep.interface if ep is not None else None
        if host_if:
            await asyncio.to_thread(delete_link, host_if)
        await asyncio.to_thread(delete_link, names.docker_peer_name(docker_ep))
        return host_if

    async def delete_endpoint(self, req: dict) -> dict:
        if (self.networks.get(req.get("NetworkID", "")) or {}).get("swarm"):
            # Swarm's IPAM never sends ReleaseAddress to us: the task's address goes with its endpoint
            with contextlib.suppress(DriverError):
                ep = await self._endpoint(req["EndpointID"])
                if ep.host == self.local.host and ep.owner.type == "docker":
                    await self.client.release_by_handle(ep.handle or ep.id)
                    self.local.remove(ep.id)
                    self.local.kick()
        host_if = await self._unplug(req["EndpointID"])
        if host_if:
            self.local.unprotect(host_if)
        if self.endpoints.pop(req["EndpointID"], None) is not None:
            self._save()
        return {}

    async def oper_info(self, req: dict) -> dict:
        return {"Value": {}}

    async def join(self, req: dict) -> dict:
        from tether.dataplane.pods import AttachError, plug_link

        network, _ = await self._network_of(req["NetworkID"])
        docker_ep = req["EndpointID"]
        ep = await self._endpoint(docker_ep)
        mtu = self.local.mtu(await self.local.network(network, self.client))
        host_if, peer = ep.interface or host_ifname(ep.id, "docker"), names.docker_peer_name(docker_ep)
        self.local.protect(host_if)
        try:
            v6 = any(":" in ip for ip in ep.ips)
            link = await asyncio.to_thread(plug_link, pod_netns=None, ifname=peer, host_ifname=host_if, mac=ep.mac,
                                           mtu=mtu, gateway6=v6)  # the peer stays here: dockerd moves it
            link.close()
        except AttachError as e:  # e.g. an endpoint whose interface names a device that is not Tether's
            self.local.unprotect(host_if)
            raise DriverError(str(e)) from None
        self.local.kick()
        self._spawn(self._adopt_container_identity(req["NetworkID"], docker_ep, ep.id))
        out = {"InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
               "Gateway": POD_GATEWAY,
               "StaticRoutes": [{"Destination": f"{POD_GATEWAY}/32", "RouteType": 1}],
               "DisableGatewayService": True}
        if v6:  # the host side holds fe80::1 (plug_link's gateway6), so the container's neighbour discovery finds it
            out["GatewayIPv6"] = POD_GATEWAY6
        return out

    async def leave(self, req: dict) -> dict:
        await self._unplug(req["EndpointID"])
        return {}

    async def _adopt_container_identity(self, network_id: str, docker_ep: str, ep_id: str) -> None:
        """Rename the endpoint after its container and copy the container's labels (after Join, once
        dockerd can answer). Retried for a while: dockerd answers inspect only after the start."""
        deadline = time.monotonic() + 60
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                nw = await self.docker.get(f"/networks/{network_id}")
                cid = next((c for c, v in (nw.get("Containers") or {}).items()
                            if v.get("EndpointID") == docker_ep and not c.startswith(("ep-", "lb-"))), None)
                if cid is not None:
                    info = await self.docker.get(f"/containers/{cid}/json", timeout=30)
                    name = (info.get("Name") or "").lstrip("/")
                    labels = {k: v for k, v in ((info.get("Config") or {}).get("Labels") or {}).items()}
                    await self._identify(ep_id, name, labels, cid)
                    return
            except (httpx.HTTPError, ValueError) as e:
                log.debug("docker API not answering yet for %s: %s", docker_ep[:12], e)
            except (ApiError, ServerUnreachable) as e:
                log.warning("cannot name docker endpoint %s yet: %s", docker_ep[:12], e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log.warning("docker endpoint %s: dockerd never said which container it is; it keeps its provisional name",
                    docker_ep[:12])

    async def _identify(self, ep_id: str, name: str, labels: dict[str, str], container_id: str) -> None:
        from tether.model import check_labels

        good = {}
        for k, v in labels.items():
            try:
                check_labels({k: v})
                good[k] = v
            except ValueError:
                log.info("container label %s=%s is not a valid Tether label; skipped", k, v)
        ep = self.local.endpoint(ep_id) or await self.client.get("Endpoint", ep_id)
        owner = Owner(type="docker", docker_endpoint_id=next((d for d, t in self.endpoints.items() if t == ep_id),
                                                             ep.owner.docker_endpoint_id), container_id=container_id)
        changes: dict[str, Any] = {"labels": {**good, "tether.io/docker": "true"}, "owner": owner.model_dump()}
        base = names.dns_label(name, ep.name)
        for candidate in (base, names.dns_label(f"{base[:50]}-{self.local.host}", base),
                          names.dns_label(f"{base[:50]}-{ep_id[:8]}", base)):
            try:
                new = await self.client.patch_endpoint(ep_id, {**changes, "name": candidate})
                break
            except ApiError as e:
                if e.status != 409:
                    raise
        else:
            new = await self.client.patch_endpoint(ep_id, changes)
        self.local.put(new)
        self.local.kick()
        log.info("docker endpoint %s is container %s (%s)", ep_id[:8], new.name, ", ".join(new.ips))

    # --- published ports ----------------------------------------------------------------------------

    @staticmethod
    def _service_name(docker_ep: str) -> str:
        return f"docker-{docker_ep[:12]}"

    async def program_external(self, req: dict) -> dict:
        maps = (req.get("Options") or {}).get(PORTMAP) or []
        if not maps:
            return {}
        network, _ = await self._network_of(req["NetworkID"])
        docker_ep = req["EndpointID"]
        ep = await self._endpoint(docker_ep)
        ports, host_ips = [], set()
        for m in maps:
            proto = PROTOCOLS.get(int(m.get("Proto", 6)))
            if proto is None:
                raise DriverError(f"tether publishes TCP and UDP ports only, not protocol {m.get('Proto')}")
            if m.get("HostPortEnd") and m.get("HostPortEnd") != m.get("HostPort"):
                raise DriverError("tether publishes single ports, not ranges; write -p HOST:CONTAINER")
            if m.get("HostIP") not in (None, "", "0.0.0.0"):
                try:
                    if ipaddress.ip_address(m["HostIP"]).version != 4:
                        raise ValueError
                except ValueError:
                    raise DriverError(f"-p {m['HostIP']}:...: tether publishes on IPv4 addresses of the host; "
                                      "give one, or none for all") from None
                host_ips.add(m["HostIP"])
            ports.append(ServicePort(name=f"{proto.lower()}-{m['Port']}", protocol=proto, port=int(m["Port"]),
                                     target_port=int(m["Port"]), node_port=int(m["HostPort"]) or None))
        if len(host_ips) > 1 or (host_ips and len(host_ips) != len(maps)):
            raise DriverError("tether publishes a container's ports on one address of the host, or on all: give "
                              "every -p the same IP, or none")
        svc = Service(name=self._service_name(docker_ep), namespace=ep.namespace, network=network, type="NodePort",
                      ports=ports, backends=[ServiceBackend(ip=ip, endpoint=ep.id) for ip in ep.ips],
                      labels={"tether.io/docker": "true"}, host=self.local.host,
                      host_ip=next(iter(host_ips), None))
        try:
            await self.client.apply(svc)
        except ApiError as e:
            raise DriverError(f"cannot publish {', '.join(str(p.node_port) for p in ports)}: {e.detail}") from None
        return {}

    async def revoke_external(self, req: dict) -> dict:
        ep = None
        with contextlib.suppress(DriverError):
            ep = await self._endpoint(req["EndpointID"])
        ns = ep.namespace if ep else "default"
        try:
            await self.client.delete("Service", f"{ns}/{self._service_name(req['EndpointID'])}")
        except ApiError as e:
            if e.status != 404:
                raise
        return {}


def docker_made(networks: Any) -> dict[str, str]:
    """Tether network name -> subnet, for the networks `docker network create` made (and so every
    Docker host shows)."""
    return {n.name: n.subnets[0].cidr for n in networks
            if n.labels.get(DOCKER_NETWORK_LABEL) == DOCKER_NETWORK_VALUE and n.subnets and SWARM_LABEL not in n.labels}


def to_create(wanted: dict[str, str], present: list[dict[str, Any]], known: dict[str, dict[str, Any]]
              ) -> list[tuple[str, str, dict[str, Any]]]:
    """The Docker networks this dockerd lacks: (name, subnet, body of POST /networks/create). A
    network is there when dockerd has one by that name, or this driver has one for that subnet."""
    names = {n.get("Name") for n in present}
    cidrs = {info.get("cidr") for info in known.values()}
    return [(name, cidr, {"Name": name, "Driver": "tether", "CheckDuplicate": True,
                          "IPAM": {"Driver": "tether", "Config": [{"Subnet": cidr}]}, "Options": {"network": name}})
            for name, cidr in sorted(wanted.items()) if name not in names and cidr not in cidrs]


async def start(agent: AgentHandle) -> list[DockerPlugin]:
    path = os.environ.get("TETHER_DOCKER_PLUGIN_SOCKET", DEFAULT_SOCKET)
    if path == "off":
        return []
    swarm = os.environ.get("TETHER_DOCKER_SWARM_SOCKET", DEFAULT_SWARM_SOCKET)
    plugin = DockerPlugin(agent.local, agent.client, agent.cfg.state_dir, path,
                          os.environ.get("TETHER_DOCKER_HOST", DEFAULT_DOCKER_HOST),
                          swarm_socket=None if swarm == "off" else swarm)
    await plugin.start()
    return [plugin]
