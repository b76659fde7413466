"""`tether server`: serve the API on TCP and/or unix sockets over one store until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from tether import heap
from tether.server.auth import is_local_listen, load_or_create_token
from tether.store.base import open_store

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


async def serve(store_url: str, listen: list[str], state_dir: str, insecure: bool, **app_options) -> None:
    from tether.server.app import create_app

    if insecure and not all(is_local_listen(a) for a in listen):
        raise SystemExit("--insecure is only allowed when every --listen address is loopback or a unix socket")
    token = None if insecure else load_or_create_token(state_dir)
    store = open_store(store_url)
    app = create_app(store, token=token, **app_options)
    sockets = [bind(a) for a in listen]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            lifespan="on")
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    log.warning("tether server on %s, store %s", ", ".join(listen), store_url)
    heap.settle()
    try:
        await server.serve(sockets=sockets)
    finally:
        await store.close()
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
    a = p.parse_args(argv)
    run_server(a.store, a.listen, a.state_dir, a.insecure, service_cidr=a.service_cidr,
               dead_host_grace=a.dead_host_grace, empty_block_grace=a.empty_block_grace, gc_interval=a.gc_interval)


if __name__ == "__main__":
    sys.exit(main())
