"""Stores: `base` holds the interface every engine implements; this package opens one by URL.

The engines import `base`, and only this module imports the engines (each lazily: etcd's client is
loaded only for an etcd store), so the interface never depends on its implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.store.base import Store

if TYPE_CHECKING:
    from tether.store.etcd import EtcdAccess


def open_store(url: str, etcd_access: EtcdAccess | None = None) -> Store:
    """Open a store from a URL: `sqlite:///path/to/file.db` or `etcd://host:port[,host:port...]`
    (`etcd_access`: an `EtcdAccess`, etcd's TLS and user, for etcd URLs)."""
    if url.startswith("sqlite://"):
        from tether.store.sqlite import SqliteStore

        path = url[len("sqlite://"):]
        return SqliteStore(path)
    if url.startswith("etcd://"):
        from tether.store.etcd import EtcdStore

        return EtcdStore([h for h in url[len("etcd://"):].split(",") if h], access=etcd_access)
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///path/tether.db or etcd://127.0.0.1:2379")
