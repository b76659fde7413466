"""`tether server`: serve the API on TCP and/or unix sockets over one store until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import threading
from typing import TYPE_CHECKING, NoReturn

import uvicorn

from tether import heap
from tether.server.auth import AdminCredential, is_local_listen, shared_admin_credential
from tether.server.limits import Limits
from tether.store import open_store
from tether.store.base import Store, StoreUnusable, Unavailable

if TYPE_CHECKING:
    from tether.store.etcd import EtcdAccess

log = logging.getLogger("tether.server")
DEFAULT_STATE_DIR = "/var/lib/tether"
DEFAULT_LISTEN = ["unix:///run/tether/server.sock", "127.0.0.1:7443"]
DEFAULT_COMPACT_KEEP = 10_000  # as many revisions as a watch may replay (--watch-max-replay)


def bind(addr: str) -> socket.socket:
    if addr.startswith("fd://"):  # a socket bound by whoever started us (systemd, the lab's netns launcher)
        sock = socket.socket(fileno=int(addr[len("fd://"):]))
        sock.set_inheritable(True)
        return sock
    if addr.startswith("unix://"):
        path = addr[len("unix://"):]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                raise SystemExit(f"another server is already listening on {path}")
            except OSError:
                os.unlink(path)  # stale socket of a dead server
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        os.chmod(path, 0o660)
    else:
        host, _, port = addr.split("://", 1)[-1].rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def wants_tls(addr: str, sock: socket.socket, insecure_http: bool) -> bool:
    """HTTPS on every TCP listener, except plain HTTP on loopback (it never leaves the machine) unless
    `https://` asks for TLS there too. Plain HTTP elsewhere only as `http://ADDR:PORT` with --insecure-http."""
    if sock.family == socket.AF_UNIX:
        return False
    if addr.startswith("https://"):
        return True
    local = is_loopback(sock)
    if addr.startswith("http://"):
        if not local and not insecure_http:
            raise SystemExit(f"--listen {addr}: plain HTTP off loopback sends every token in clear over the network; "
                             "drop http:// (TLS is the default) or, on a network you fully trust, add --insecure-http")
        return False
    return not local


def fd_budget(wanted: int) -> int:
    """Raise the soft file-descriptor limit towards the hard one and return how many connections
    fit in it, with room left for the store and logs: past the limit accept() fails for everyone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 256 if hard == resource.RLIM_INFINITY else min(hard, wanted + 256)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return wanted if soft == resource.RLIM_INFINITY else max(16, min(wanted, soft - 128))


def force_exit_after(seconds: float) -> None:
    """The last resort of a stop: exit even if a task, a thread or the store will not finish.
    The store loses nothing (SQLite's WAL and etcd keep every acknowledged write)."""
    def fire() -> None:
        log.error("still running %.1f s after SIGTERM: exiting now", seconds)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


@dataclasses.dataclass
class TlsOptions:
    cert: str | None = None  # operator files; None: the state dir's own CA and certificate
    key: str | None = None
    ca: str | None = None
    sans: list[str] = dataclasses.field(default_factory=list)
    insecure_http: bool = False


class TetherServer(uvicorn.Server):
    """uvicorn's server with one SSL context per listener (uvicorn has one for all): plain HTTP on
    unix sockets and loopback, HTTPS on the others."""

    def __init__(self, config: uvicorn.Config, tls: dict[int, ssl.SSLContext | None], handshake_timeout: float) -> None:
        super().__init__(config)
        self.tls, self.handshake_timeout = tls, handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state, _loop=_loop)

        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets or []:
            ctx = self.tls.get(sock.fileno())
            kw = {"ssl": ctx, "ssl_handshake_timeout": self.handshake_timeout} if ctx else {}
            self.servers.append(await loop.create_server(create_protocol, sock=sock, backlog=config.backlog, **kw))
        self.started = True


def tls_context(tls: TlsOptions, state_dir: str, listen: list[str]) -> tuple[ssl.SSLContext, bytes | None]:
    """The listeners' SSL context and the CA PEM clients verify with (served at /ca.crt)."""
    from tether.server.tls import TlsFiles, ensure_tls, server_context

    if bool(tls.cert) != bool(tls.key):
        raise SystemExit("--tls-cert and --tls-key go together (the certificate and its private key)")
    files = TlsFiles(tls.cert, tls.key, tls.ca) if tls.cert and tls.key else ensure_tls(state_dir, listen, tls.sans)
    ca_pem = None
    if files.ca:
        with open(files.ca, "rb") as f:
            ca_pem = f.read()
    return server_context(files), ca_pem


def open_database(store_url: str, etcd_access: EtcdAccess | None = None) -> Store:
    """Open the store, or exit with one line saying what is wrong with the database and what to do,
    and an exit code that says which (see tether.store.sqlite): no traceback for an operator's problem."""
    try:
        return open_store(store_url, etcd_access)
    except StoreUnusable as e:
        unusable(e)


def unusable(e: StoreUnusable) -> NoReturn:
    print(f"tether server: {e}", file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None


async def first_contact(store: Store) -> None:
    """Reach the store once before serving, waiting while it is down: a store that refuses this
    configuration (etcd: wrong CA, client certificate, user or password) stops the server now."""
    while True:
        try:
            await store.revision()
            return
        except StoreUnusable as e:
            unusable(e)
        except Unavailable as e:
            log.warning("waiting for the store: %s", e)
            await asyncio.sleep(2)


async def serve(store_url: str, listen: list[str], state_dir: str, insecure: bool, limits: Limits | None = None,
                tls: TlsOptions | None = None, etcd_access: EtcdAccess | None = None, **app_options) -> None:
    from tether.server.app import create_app
    from tether.server.listener import guarded_protocol

    if insecure and not all(is_local_listen(a) for a in listen):
        raise SystemExit("--insecure is only allowed when every --listen address is loopback or a unix socket")
    limits = limits or Limits()
    budget = fd_budget(limits.max_connections)
    if budget < limits.max_connections:
        log.warning("--max-connections %d lowered to %d: the file-descriptor limit (ulimit -n) allows no more",
                    limits.max_connections, budget)
        limits = dataclasses.replace(limits, max_connections=budget)
    tls = tls or TlsOptions()
    store = open_database(store_url, etcd_access)  # first: a store it cannot use is the clearest thing to report
    await first_contact(store)
    credential = None if insecure else await credential_from(store, state_dir)
    if app_options.get("compact_keep") is None:  # etcd keeps all history unless told; SQLite compacts itself
        app_options["compact_keep"] = DEFAULT_COMPACT_KEEP if store_url.startswith("etcd://") else 0
    sockets = [bind(a) for a in listen]
    secure = {s.fileno(): wants_tls(a, s, tls.insecure_http) for a, s in zip(listen, sockets, strict=True)}
    signer = False
    if any(secure.values()) and not tls.cert:  # the cluster's own CA: one for every server on this store
        signer = await cluster_ca_from(store, state_dir, listen, tls.sans)
    ctx, ca_pem = tls_context(tls, state_dir, listen) if any(secure.values()) or tls.cert else (None, None)
    for a, s in zip(listen, sockets, strict=True):
        if s.family != socket.AF_UNIX and not secure[s.fileno()] and not is_loopback(s):
            log.warning("--listen %s serves plain HTTP off loopback (--insecure-http): tokens cross the network "
                        "in clear, and anyone on the path can read and change every answer", a)
    app = create_app(store, token=None, credential=credential, limits=limits, ca_pem=ca_pem, **app_options)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=guarded_protocol(limits), timeout_keep_alive=max(1, round(limits.idle_timeout)),
                            timeout_graceful_shutdown=2, h11_max_incomplete_event_size=16 << 10)
    server = TetherServer(config, {fd: ctx if on else None for fd, on in secure.items()}, limits.header_timeout)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not server.should_exit:
            force_exit_after(limits.shutdown_deadline)
        server.should_exit = True
        app.state.watches.stop_all()  # watch streams end now, not after the graceful period

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    log.warning("tether server on %s, store %s", ", ".join(
        f"{a} ({'https' if secure[s.fileno()] else 'http'})" if s.family != socket.AF_UNIX else a
        for a, s in zip(listen, sockets, strict=True)), store_url)
    heap.settle()
    signing = None
    if signer:  # this server holds the CA key: it signs the certificates of the servers that do not
        from tether.server.tls import sign_requests

        signing = asyncio.create_task(sign_requests(store, state_dir))
    try:
        await server.serve(sockets=sockets)
    finally:
        if signing is not None:
            signing.cancel()
        for conn in list(server.server_state.connections):  # clients that never read: drop their buffers
            with contextlib.suppress(Exception):
                conn.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 1)
        for a in listen:
            if a.startswith("unix://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(a[len("unix://"):])


async def credential_from(store: Store, state_dir: str) -> AdminCredential:
    """The admin credential every server on this store shares; waits for the store to answer."""
    while True:
        try:
            return await shared_admin_credential(store, state_dir)
        except Unavailable as e:
            log.warning("waiting for the store to learn the cluster's admin token: %s", e)
            await asyncio.sleep(2)


async def cluster_ca_from(store: Store, state_dir: str, listen: list[str], sans: list[str]) -> bool:
    """Join the CA every server on this store shares (see tether.server.tls); waits for the store."""
    from tether.server.tls import join_cluster_ca

    while True:
        try:
            return await join_cluster_ca(store, state_dir, listen, sans)
        except Unavailable as e:
            log.warning("waiting for the store to learn the cluster's CA: %s", e)
            await asyncio.sleep(2)


def run_server(store_url: str | None, listen: list[str] | None, state_dir: str = DEFAULT_STATE_DIR,
               insecure: bool = False, **app_options) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store_url = store_url or f"sqlite://{os.path.join(state_dir, 'tether.db')}"
    asyncio.run(serve(store_url, listen or DEFAULT_LISTEN, state_dir, insecure, **app_options))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether server", description="Serve the Tether API over a store.")
    p.add_argument("--store", help="sqlite:///path/tether.db (default, in --state-dir) or etcd://host:port[,...]")
    p.add_argument("--listen", action="append",
                   help="host:port (HTTPS, or plain HTTP on loopback), https://host:port (HTTPS even on loopback), "
                        "http://host:port (plain: loopback, or with --insecure-http), unix:///path, or fd://N "
                        "(an inherited bound socket); repeatable")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--insecure", action="store_true", help="no token (loopback/unix listeners only)")
    add_tls_flags(p)
    p.add_argument("--service-cidr", default="10.96.0.0/16", help="the range of IPv4 service virtual IPs")
    p.add_argument("--service-cidr6", default="fd96::/112",
                   help="the range of IPv6 service virtual IPs (services with ip_families IPv6)")
    p.add_argument("--dead-host-grace", type=float, default=600.0, metavar="SECONDS",
                   help="a host whose agent has not sent a heartbeat (to any server) for this long loses its "
                        "endpoints and address blocks (default %(default)s)")
    p.add_argument("--empty-block-grace", type=float, default=300.0, metavar="SECONDS",
                   help="an address block empty for this long returns to the pool (default %(default)s)")
    p.add_argument("--gc-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between garbage collection and compaction rounds; they run only on the server "
                        "elected leader among those sharing the store; 0 turns them off (default %(default)s)")
    p.add_argument("--compact-keep", type=int, default=None, metavar="REVISIONS",
                   help="revisions of history kept when the leader compacts etcd (default "
                        f"{DEFAULT_COMPACT_KEEP} for etcd; 0: never compact, then etcd's own --auto-compaction-* "
                        "must; SQLite compacts itself)")
    add_etcd_flags(p)
    add_limit_flags(p)
    a = p.parse_args(argv)
    if a.compact_keep is not None and a.compact_keep < 0:
        raise SystemExit("--compact-keep must be 0 (off) or a number of revisions")
    run_server(a.store, a.listen, a.state_dir, a.insecure, service_cidr=a.service_cidr, service_cidr6=a.service_cidr6,
               dead_host_grace=a.dead_host_grace, empty_block_grace=a.empty_block_grace, gc_interval=a.gc_interval,
               compact_keep=a.compact_keep, limits=limits_from(a), tls=tls_from(a), etcd_access=etcd_access_from(a))


def add_etcd_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd access", "TLS and authentication towards etcd (with --store etcd://...)")
    g.add_argument("--etcd-cacert", metavar="PEM", help="CA that signed etcd's client-URL certificates: talk TLS to "
                   "etcd (etcd's --cert-file/--key-file) and verify it")
    g.add_argument("--etcd-cert", metavar="PEM", help="Tether's client certificate, for an etcd with "
                   "--client-cert-auth (signed by a CA in etcd's --trusted-ca-file; with etcd auth on, its common "
                   "name is the etcd user)")
    g.add_argument("--etcd-key", metavar="PEM", help="the private key of --etcd-cert")
    g.add_argument("--etcd-user", help="etcd user (etcd auth enabled); give it a role with readwrite on /tether/")
    g.add_argument("--etcd-password-file", metavar="FILE", help="file holding --etcd-user's password (not a flag: "
                   "command lines are visible to every local user)")


def etcd_access_from(a: argparse.Namespace) -> EtcdAccess | None:
    return etcd_access_of(a.store, a.etcd_cacert, a.etcd_cert, a.etcd_key, a.etcd_user, a.etcd_password_file)


def etcd_access_of(store: str | None, cacert: str | None, cert: str | None, key: str | None, user: str | None,
                   password_file: str | None) -> EtcdAccess | None:
    """The `EtcdAccess` of the --etcd-* flags, or None when none is given (plain, open etcd)."""
    if not any((cacert, cert, key, user, password_file)):
        return None
    if store is None or not store.startswith("etcd://"):
        raise SystemExit("--etcd-* flags need --store etcd://HOST:PORT[,...]")
    from tether.store.etcd import EXIT_CONFIG, EtcdAccess

    password = None
    if password_file:
        if user is None:
            raise SystemExit("--etcd-password-file needs --etcd-user")
        try:
            with open(password_file) as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            print(f"tether server: --etcd-password-file {password_file}: {e.strerror}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None
    return EtcdAccess(cacert, cert, key, user, password)


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="server certificate (PEM) instead of the one made from the state dir's own CA")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", help="CA bundle that signed --tls-cert, served to joining hosts at /ca.crt")
    p.add_argument("--tls-san", action="append", default=[],
                   help="extra name or address the made certificate covers (repeatable; the listen addresses, "
                        "localhost and this machine's name are always in it)")
    p.add_argument("--insecure-http", action="store_true",
                   help="DANGEROUS: plain HTTP on non-loopback TCP listeners. Every token (the admin's and the "
                        "hosts') then crosses the network in clear and anyone on the path can change answers; "
                        "only for a network you fully trust, or behind your own TLS proxy")


def tls_from(a: argparse.Namespace) -> TlsOptions:
    return TlsOptions(a.tls_cert, a.tls_key, a.tls_ca, list(a.tls_san), a.insecure_http)


LIMIT_HELP = {
    "max_body": "largest request body in bytes (413 above it)",
    "body_timeout": "seconds to receive a request body once its headers are in (408 after)",
    "header_timeout": "seconds a new connection has to send its request headers",
    "idle_timeout": "seconds a keep-alive connection may wait for its next request",
    "write_timeout": "seconds a client may leave an answer unread before it is cut off",
    "send_buffer": "kernel send buffer per TCP connection in bytes (what a client that stops reading pins)",
    "max_connections": "open connections, all listeners together",
    "max_watches": "watch streams in all",
    "max_watches_per_client": "watch streams per client (IP address, or unix-socket peer process)",
    "watch_buffer": "event bytes buffered per watch stream",
    "watch_stall": "seconds a full watch buffer may stay undrained before the watcher must resync",
    "watch_max_replay": "revisions a watch may start behind the head (older: the client must resync)",
    "shutdown_deadline": "seconds from SIGTERM to exit, whatever the clients do",
}


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{LIMIT_HELP[f.name]} (default %(default)s)")


def limits_from(a: argparse.Namespace) -> Limits:
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(Limits)}
    if values["header_timeout"] <= 0 or values["idle_timeout"] <= 0 or values["max_body"] < 1024:
        raise SystemExit("--header-timeout and --idle-timeout must be > 0 and --max-body at least 1024")
    return Limits(**values)


if __name__ == "__main__":
    sys.exit(main())
