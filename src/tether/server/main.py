"""`tether server`: serve the API on TCP and/or unix sockets over one store until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import sys
import threading

import uvicorn

from tether import heap
from tether.server.auth import is_local_listen, load_or_create_token
from tether.server.limits import Limits
from tether.store.base import Store, open_store

log = logging.getLogger("tether.server")
DEFAULT_STATE_DIR = "/var/lib/tether"
DEFAULT_LISTEN = ["unix:///run/tether/server.sock", "127.0.0.1:7443"]


def bind(addr: str) -> socket.socket:
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
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


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


def open_database(store_url: str) -> Store:
    """Open the store, or exit with one line saying what is wrong with the database and what to do,
    and an exit code that says which (see tether.store.sqlite): no traceback for an operator's problem."""
    from tether.store.sqlite import DatabaseUnusable

    try:
        return open_store(store_url)
    except DatabaseUnusable as e:
        print(f"tether server: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


async def serve(store_url: str, listen: list[str], state_dir: str, insecure: bool, limits: Limits | None = None,
                **app_options) -> None:
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
    store = open_database(store_url)  # first: a database it cannot use is the clearest thing to report
    token = None if insecure else load_or_create_token(state_dir)
    app = create_app(store, token=token, limits=limits, **app_options)
    sockets = [bind(a) for a in listen]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=guarded_protocol(limits), timeout_keep_alive=max(1, round(limits.idle_timeout)),
                            timeout_graceful_shutdown=2, h11_max_incomplete_event_size=16 << 10)
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not server.should_exit:
            force_exit_after(limits.shutdown_deadline)
        server.should_exit = True
        app.state.watches.stop_all()  # watch streams end now, not after the graceful period

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    log.warning("tether server on %s, store %s", ", ".join(listen), store_url)
    heap.settle()
    try:
        await server.serve(sockets=sockets)
    finally:
        for conn in list(server.server_state.connections):  # clients that never read: drop their buffers
            with contextlib.suppress(Exception):
                conn.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 1)
        for a in listen:
            if a.startswith("unix://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(a[len("unix://"):])


def run_server(store_url: str | None, listen: list[str] | None, state_dir: str = DEFAULT_STATE_DIR,
               insecure: bool = False, **app_options) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store_url = store_url or f"sqlite://{os.path.join(state_dir, 'tether.db')}"
    asyncio.run(serve(store_url, listen or DEFAULT_LISTEN, state_dir, insecure, **app_options))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether server", description="Serve the Tether API over a store.")
    p.add_argument("--store", help="sqlite:///path/tether.db (default, in --state-dir) or etcd://host:port[,...]")
    p.add_argument("--listen", action="append", help="host:port or unix:///path (repeatable)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--insecure", action="store_true", help="no token (loopback/unix listeners only)")
    p.add_argument("--service-cidr", default="10.96.0.0/16")
    p.add_argument("--dead-host-grace", type=float, default=600.0)
    p.add_argument("--empty-block-grace", type=float, default=300.0)
    p.add_argument("--gc-interval", type=float, default=30.0)
    add_limit_flags(p)
    a = p.parse_args(argv)
    run_server(a.store, a.listen, a.state_dir, a.insecure, service_cidr=a.service_cidr,
               dead_host_grace=a.dead_host_grace, empty_block_grace=a.empty_block_grace, gc_interval=a.gc_interval,
               limits=limits_from(a))


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
