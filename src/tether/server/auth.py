"""Who is calling, and what they may do.

Three kinds of bearer token:
- the admin token (made at first start, kept in a 0600 file `token` in the state dir): people and
  automation, everything;
- bootstrap tokens (`<id>.<secret>`, made by `tether host token create --ttl 30m`): only exchange
  themselves for a host credential at `POST /api/v1/join`, until they expire;
- host credentials (`host.<name>.<secret>`, one per host, from the join): what that host's agent
  needs and no more, on the model of the Kubernetes node authorizer (`host_rule`).
The admin token's hash is shared through the store (`ADMIN_TOKEN_KEY`): the first server on a store
puts it there, the others check requests against it, so a second server needs no file copied by hand.
Bootstrap tokens and host credentials are kept in the store as SHA-256 hashes (the secrets are 128+
random bits, so a fast hash suffices) under `AUTH_PREFIX`, outside the object prefix: no list,
snapshot, watch or object write reaches them. Deleting the key locks the holder out on its next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass

from tether.model import check_dns_label
from tether.store.base import Conflict, Store

OPEN_PATHS = {"/", "/healthz", "/metrics", "/ca.crt"}
AUTH_PREFIX = "/tether/auth/"  # not under tether.model.PREFIX: never listed, watched or written as an object
HOST_CREDENTIALS = AUTH_PREFIX + "hosts/"
BOOTSTRAP_TOKENS = AUTH_PREFIX + "bootstrap/"
ADMIN_TOKEN_KEY = AUTH_PREFIX + "admin-token-sha256"
log = logging.getLogger("tether.server")
BOOTSTRAP_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def load_or_create_token(state_dir: str) -> str:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "token")
    if os.path.exists(path):
        with open(path) as f:
            token = f.read().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def bearer(headers) -> str | None:
    """`Authorization: Bearer <token>`, or `X-Auth-Token: <token>` as Neutron clients send it."""
    h = headers.get("authorization")
    if h and h.startswith("Bearer "):
        return h[7:].strip()
    x = headers.get("x-auth-token")
    return x.strip() if x else None


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class AdminCredential:
    """The admin token, known by its SHA-256 only (what the store holds for every server on it)."""

    sha256: str

    @classmethod
    def of_token(cls, token: str) -> AdminCredential:
        return cls(digest(token))

    def matches(self, token: str) -> bool:
        return same(digest(token), self.sha256)


async def shared_admin_credential(store: Store, state_dir: str) -> AdminCredential:
    """The cluster's admin credential: the one in the store, or (first server) this server's token,
    made now if it has none, and stored for the servers that come after."""
    path = os.path.join(state_dir, "token")
    for _ in range(3):
        kv = await store.get(ADMIN_TOKEN_KEY)
        if kv is not None:
            shared = AdminCredential(kv.value.decode())
            local = _read_token(path)
            if local is None:
                log.warning("admin token: the one shared through the store (set by the first server on it); this "
                            "server has no copy: use the first server's token (its state dir, file 'token')")
            elif not shared.matches(local):
                log.warning("the token in %s is not the cluster's admin token (shared through the store by the "
                            "first server): it is refused; use the first server's token, or delete %s", path, path)
            return shared
        token = load_or_create_token(state_dir)
        try:
            await store.create(ADMIN_TOKEN_KEY, digest(token).encode())
            return AdminCredential.of_token(token)
        except Conflict:  # another server stored its token first
            continue
    raise RuntimeError("could not agree on an admin token with the other servers")


def _read_token(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Identity:
    kind: str  # "admin" | "host" | "bootstrap"
    name: str = ""  # the host's name; the bootstrap token's id

    def __str__(self) -> str:
        return self.kind if self.kind == "admin" else f"{self.kind} {self.name!r}"


ADMIN = Identity("admin")


class Denied(Exception):
    """401: no valid credential (`detail` says which and what to do)."""


class Credentials:
    """Admin token, bootstrap tokens and host credentials over one store."""

    def __init__(self, store: Store, admin: AdminCredential | None) -> None:
        self.store, self.admin = store, admin

    async def identify(self, token: str | None) -> Identity:
        if self.admin is None:
            return ADMIN  # --insecure: no tokens at all (loopback/unix listeners only)
        if not token:
            raise Denied("no bearer token: pass --token or set TETHER_TOKEN (the admin token is in the server's "
                         "state dir, file 'token'; a host's credential is in its agent's state dir, file "
                         "'credential'); Neutron clients send it as X-Auth-Token")
        if self.admin.matches(token):
            return ADMIN
        if token.startswith("host."):
            name, _, secret = token[5:].partition(".")
            kv = await self.store.get(HOST_CREDENTIALS + name) if name and secret else None
            if kv is None or not same(json.loads(kv.value).get("sha256", ""), digest(secret)):
                raise Denied(f"the credential of host {name!r} is not valid (revoked, or the host was deleted); "
                             "join the host again with a new bootstrap token: tether host join")
            return Identity("host", name)
        m = BOOTSTRAP_RE.match(token)
        if m:
            kv = await self.store.get(BOOTSTRAP_TOKENS + m.group(1))
            rec = json.loads(kv.value) if kv is not None else {}
            if not rec or not same(rec.get("sha256", ""), digest(m.group(2))):
                raise Denied("unknown or expired bootstrap token (a token is deleted when its TTL ends); create "
                             "one with `tether host token create --ttl 30m` (admin)")
            # a token on a store lease lives exactly its TTL by the store's clock, whatever a server's
            # wall clock does; only records written before tokens had leases go by the wall clock
            if not kv.lease and rec.get("expires", 0) <= time.time():
                raise Denied(f"bootstrap token {m.group(1)} expired at "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(rec.get('expires', 0)))}; "
                             "create a new one with `tether host token create --ttl 30m`")
            return Identity("bootstrap", m.group(1))
        raise Denied("wrong bearer token: pass the admin token (the server's state dir, file 'token') or this "
                     "host's credential (its agent's state dir, file 'credential')")

    async def create_bootstrap(self, ttl: float, description: str = "") -> tuple[str, float]:
        await self._forget_expired()
        token_id = "".join(secrets.choice(ALPHABET) for _ in range(6))
        secret = "".join(secrets.choice(ALPHABET) for _ in range(16))
        expires = time.time() + ttl  # for people; the lease decides (see `identify`)
        rec = {"sha256": digest(secret), "expires": expires, "created": time.time(), "description": description}
        lease = await self.store.grant_lease(ttl)
        await self.store.put(BOOTSTRAP_TOKENS + token_id, json.dumps(rec).encode(), lease=lease)
        return f"{token_id}.{secret}", expires

    async def _forget_expired(self) -> None:
        """Expired bootstrap tokens are useless: drop them when a new one is made."""
        for kv in (await self.store.list(BOOTSTRAP_TOKENS)).items:
            if kv.lease:  # the store deletes it when its lease ends
                continue
            try:
                expired = json.loads(kv.value).get("expires", 0) <= time.time()
            except ValueError:
                expired = True
            if expired:
                with contextlib.suppress(Conflict):  # used or dropped meanwhile
                    await self.store.delete(kv.key, kv.mod_revision)

    async def forget_bootstrap(self, token_id: str) -> bool:
        kv = await self.store.get(BOOTSTRAP_TOKENS + token_id)
        if kv is None:
            return False
        await self.store.delete(kv.key)
        return True

    async def issue_host(self, name: str, by: str) -> str:
        """A new credential for a host; refused if it has one (a bootstrap token must not let anyone
        take over an existing host's identity: revoke it first to re-join)."""
        check_dns_label(name, "host name")
        secret = secrets.token_urlsafe(32)
        rec = {"sha256": digest(secret), "created": time.time(), "by": by}
        try:
            await self.store.create(HOST_CREDENTIALS + name, json.dumps(rec).encode())
        except Conflict:
            raise HostHasCredential(name) from None
        return f"host.{name}.{secret}"

    async def revoke_host(self, name: str) -> bool:
        kv = await self.store.get(HOST_CREDENTIALS + name)
        if kv is None:
            return False
        await self.store.delete(kv.key)
        return True

    async def host_valid(self, name: str) -> bool:
        return await self.store.get(HOST_CREDENTIALS + name) is not None


class HostHasCredential(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"host {name!r} already has a credential; if it is being re-installed, revoke the old "
                         f"one first (tether host revoke {name}), then join again")


HOST_READS = re.compile(r"^/api/v1/")
OWN_HOST = re.compile(r"^/api/v1/hosts/(?P<name>[^/]+)(?P<sub>/status|/heartbeat|/flows|/peers)?$")
OWNED_ROUTES = {("POST", "/api/v1/endpoints")}  # the route checks the body's host (api.require_own)
ENDPOINT = re.compile(r"^/api/v1/endpoints/[^/]+$|^/api/v1/endpoints/by-handle/.+$")
NAMESPACE = re.compile(r"^/api/v1/namespaces/[^/]+$")
NETWORK = re.compile(r"^/api/v1/networks/[^/]+$")
SERVICE = re.compile(r"^/api/v1/namespaces/[^/]+/services/[^/]+$")
# the label the Docker driver puts on a Tether network it creates; a host credential may create and
# delete such networks (the route checks: `api.require_docker_network`), so `docker network create`
# and `docker network rm` work on any Docker host without the admin token, and touch nothing else
DOCKER_NETWORK_LABEL = "tether.io/created-by"
DOCKER_NETWORK_VALUE = "docker"


def host_rule(host: str, method: str, path: str) -> str | None:
    """None when a host credential may make this call (the endpoint and namespace routes then check
    that the object is the host's own, or new: `api.require_own`), else why not. Reads: everything
    its agent mirrors. Writes: its own host object, status, heartbeat, flow records and peer health;
    endpoints on itself (addresses come with them); a namespace that does not exist yet (CNI ADD in a
    new namespace); creating, and deleting, a network labelled as made by the Docker driver (`docker
    network create/rm`; the network routes check the label, that the network is new on create, and its
    other fields); a service publishing only on this host with only its own endpoints as backends
    (Docker's -p, CNI hostPort; the service routes check: `api.require_host_service`)."""
    if method in ("GET", "HEAD"):
        if HOST_READS.match(path):
            return None
        return f"host {host!r} may read only the /api/v1 objects its agent mirrors"
    m = OWN_HOST.match(path)
    if m and (method, m.group("sub")) in (("PUT", None), ("PUT", "/status"), ("POST", "/heartbeat"),
                                                  ("POST", "/flows"), ("POST", "/peers")):
        if m.group("name") == host:
            return None
        return f"host {host!r} may write only its own host object, not {m.group('name')!r}"
    if (method, path) in OWNED_ROUTES:
        return None
    if method in ("PATCH", "DELETE") and ENDPOINT.match(path):
        return None
    if method == "PUT" and NAMESPACE.match(path):
        return None
    if method in ("PUT", "DELETE") and (NETWORK.match(path) or SERVICE.match(path)):
        return None
    return (f"host {host!r} may not {method} {path}: a host credential writes only its own host, status and "
            "endpoints; use the admin token for anything else")


def is_local_listen(addr: str) -> bool:
    """True for unix sockets and loopback TCP addresses (the only ones --insecure may serve)."""
    if addr.startswith("unix://"):
        return True
    if addr.startswith("fd://"):
        return False
    addr = addr.split("://", 1)[-1]
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorize(who: Identity, method: str, path: str) -> str | None:
    """None when `who` may make this call (before the route's own checks), else why not (403)."""
    if who.kind == "admin":
        return None
    if who.kind == "bootstrap":
        if (method, path) == ("POST", "/api/v1/join"):
            return None
        return "a bootstrap token can only join a host (tether host join); use the admin token or the host's credential"
    if path == "/api/v1/join":
        return f"host {who.name!r} already has a credential; joining again needs a bootstrap token"
    return host_rule(who.name, method, path)
